"""The demo web app in a real browser: `python -m koclip.app` on 127.0.0.1, driven by Debian's
headless chromium through Playwright, over a small index embedded with the tiny checkpoint.

One server per module (it loads the model and the index once); each test gets a fresh browser
context, so a fresh Streamlit session. Screenshots of what each test saw go to
$KOCLIP_TEST_ARTIFACTS, else to an `app-artifacts` folder under pytest's basetemp, with the
server's log.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import expect, sync_playwright

from koclip.app.launcher import main as app_main
from app_harness import CHROMIUM, RESULT_TIMEOUT_MS, TABS, AppServer, Tour, launch_chromium
from koclip.app.page import InputError, check_template, check_text, decode_upload, parse_labels

# Korean captions for generated pictures: a shape in a colour on white.
COLOURS = {"빨간": (220, 30, 30), "파란": (30, 60, 220), "초록": (30, 160, 60), "노란": (240, 200, 20),
           "검은": (20, 20, 20), "보라": (130, 40, 160)}
SHAPES = ("원", "네모", "세모", "십자")


def draw(colour: tuple[int, int, int], shape: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(image)
    box = (16, 16, size - 16, size - 16)
    if shape == "원":
        d.ellipse(box, fill=colour)
    elif shape == "네모":
        d.rectangle(box, fill=colour)
    elif shape == "세모":
        d.polygon([(size // 2, 12), (size - 12, size - 12), (12, size - 12)], fill=colour)
    else:
        d.rectangle((size // 2 - 10, 12, size // 2 + 10, size - 12), fill=colour)
        d.rectangle((12, size // 2 - 10, size - 12, size // 2 + 10), fill=colour)
    return image


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[tuple[Path, str]]:
    """24 generated pictures (a shape in a colour on white) and their Korean captions."""
    root = tmp_path_factory.mktemp("app-pictures")
    pictures = []
    for colour_name, colour in COLOURS.items():
        for shape in SHAPES:
            path = root / f"{len(pictures):02d}.png"
            draw(colour, shape).save(path)
            pictures.append((path, f"{colour_name} {shape}"))
    return pictures


def embed_store(ckpt_dir: str, pictures: list[tuple[Path, str]], store: Path) -> str:
    """An embedding store (one shard) of the pictures and captions, embedded by the checkpoint."""
    import hashlib

    from koclip.checkpoint import load_checkpoint
    from koclip.encoders import checkpoint_encoders
    from koclip.processing import ImagePreprocessor
    from koclip.store import Row, rows_to_table, write_shard

    ckpt = load_checkpoint(ckpt_dir)
    encoders = checkpoint_encoders(ckpt, batch_size=8)
    images = encoders.images(ImagePreprocessor.from_config(ckpt.config).batch([str(p) for p, _ in pictures]))
    texts = encoders.texts([caption for _, caption in pictures])
    rows = [Row(id=f"item-{i:02d}", uri=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                width=96, height=96, captions=[caption], image_embedding=images[i], caption_embeddings=texts[i:i + 1])
            for i, (path, caption) in enumerate(pictures)]
    write_shard(str(store / "shard-00000.parquet"),
                rows_to_table(rows, ckpt.fingerprint, ckpt.config.to_dict(), images.shape[1]))
    return str(store)


@pytest.fixture(scope="module")
def app_index(tiny_ckpt_dir, pictures, tmp_path_factory):
    """A published index of the 24 pictures, embedded with the tiny checkpoint."""
    from koclip.index import build_index

    root = tmp_path_factory.mktemp("app-corpus")
    build_index(embed_store(tiny_ckpt_dir, pictures, root / "embeddings"), str(root / "index"), kind="flat")
    return str(root / "index")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("KOCLIP_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.getbasetemp() / "app-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(app_index, tiny_ckpt_dir, artifacts):
    with AppServer(app_index, tiny_ckpt_dir, artifacts / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: `apt-get install chromium` for the browser tests")
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def tour(server, browser, artifacts, request):
    """A fresh session on the app; a screenshot named after the test is saved when it ends."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    visit = Tour(page, server.url)
    visit.open()
    yield visit
    visit.screenshot(artifacts / f"{request.node.name}.png")
    context.close()


@pytest.fixture(scope="module")
def upload_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("uploads")
    files = {"image": root / "red-circle.png", "text": root / "notes.txt"}
    draw(COLOURS["빨간"], "원", size=120).save(files["image"])
    files["text"].write_text("this is a text file, not a picture\n")
    return files


# ---------------------------------------------------------------- launcher (no browser)


def test_missing_index_or_model_is_one_line_and_exit_2(tiny_ckpt_dir, tmp_path, capsys):
    assert app_main(["--index", str(tmp_path / "no-index"), "--model", tiny_ckpt_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no index at" in err and "python -m pipelines.index" in err

    assert app_main(["--index", str(tmp_path), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no model at" in err and "python -m jobs.train" in err


def test_the_command_exits_2_before_starting_a_server(tmp_path):
    done = subprocess.run([sys.executable, "-m", "koclip.app", "--index", str(tmp_path / "none"),
                           "--model", str(tmp_path / "none"), "--port", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("koclip.app: error: no model at") and "python -m jobs.train" in done.stderr
    assert "Streamlit" not in done.stdout + done.stderr


def test_input_checks():
    assert parse_labels(" 고양이 \n\n강아지\n고양이\n") == ["고양이", "강아지"]
    with pytest.raises(InputError, match="at least one label"):
        parse_labels(" \n\n")
    assert check_template("a photo of {}") == "a photo of {}"
    with pytest.raises(InputError, match="exactly once"):
        check_template("이것은 고양이 이다.")
    with pytest.raises(InputError, match="Type a query"):
        check_text("   ")
    buffer = io.BytesIO()
    draw((0, 0, 0), "원").save(buffer, format="PNG")
    assert decode_upload("ok.png", buffer.getvalue()).size == (96, 96)
    with pytest.raises(InputError, match=r"notes\.txt is not an image .*not a recognised image format"):
        decode_upload("notes.txt", b"hello")


# ---------------------------------------------------------------- in the browser


def test_text_query_shows_the_library_ranking_as_images(tour, app_index, tiny_ckpt_dir):
    from koclip.query import search

    panel = tour.search("빨간 원")
    images = panel.locator('[data-testid="stImage"]')
    expect(images).to_have_count(12, timeout=RESULT_TIMEOUT_MS)  # k defaults to 12
    expect(panel.get_by_text("12 nearest images for “빨간 원”")).to_be_visible()
    # Each image really loaded (has pixels), and the captions are the library's hits in order.
    for i in range(12):
        expect(images.nth(i).locator("img")).to_have_js_property("naturalWidth", 96)
    hits = search("빨간 원", k=12, index=app_index, model=tiny_ckpt_dir)
    shown = panel.locator('[data-testid="stImageCaption"]').all_inner_texts()
    assert shown == [f"{h.rank}. {h.captions[0]} · {h.score:.3f}" for h in hits]


def test_empty_query_warns_and_the_app_keeps_working(tour):
    panel = tour.search("   ")
    expect(panel.locator('[data-testid="stAlert"]')).to_contain_text("Type a query first")
    expect(panel.locator('[data-testid="stImage"]')).to_have_count(0)
    panel = tour.search("파란 네모", k=5)
    expect(panel.locator('[data-testid="stImage"]')).to_have_count(5, timeout=RESULT_TIMEOUT_MS)
    expect(panel.get_by_text("5 nearest images for “파란 네모”")).to_be_visible()
    expect(panel.locator('[data-testid="stAlert"]')).to_have_count(0)


def test_uploaded_image_gets_the_probability_chart(tour, upload_files, tiny_ckpt_dir):
    from koclip.query import classify

    labels = ["빨간 원", "파란 네모", "초록 세모"]
    panel = tour.classify(upload_files["image"], labels)
    expect(panel.locator('[data-testid="stVegaLiteChart"]')).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    ranked = classify(upload_files["image"].read_bytes(), labels, model=tiny_ckpt_dir)
    best, probability = ranked[0]
    expect(panel.get_by_text(f"Most likely: {best} ({probability:.1%})")).to_be_visible()
    drawing = panel.locator('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg').first
    expect(drawing).to_be_visible()  # Vega has drawn the bars
    assert drawing.bounding_box()["height"] > 50


def test_index_item_can_be_classified(tour):
    panel = tour.classify(None, ["빨간", "파란"])  # the picker's first item
    expect(panel.locator('[data-testid="stVegaLiteChart"]')).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(panel.get_by_text(re.compile(r"^Most likely: (빨간|파란) \(\d+\.\d%\)$"))).to_be_visible()


def test_empty_labels_and_bad_template_are_errors(tour, upload_files):
    panel = tour.classify(upload_files["image"], [])
    expect(panel.locator('[data-testid="stAlert"]')).to_contain_text("Enter at least one label")
    expect(panel.locator('[data-testid="stVegaLiteChart"]')).to_have_count(0)
    panel = tour.classify(None, ["고양이"], template="이것은 고양이 이다.")
    expect(panel.locator('[data-testid="stAlert"]')).to_contain_text("must contain {} exactly once")
    panel = tour.classify(None, ["고양이", "강아지"], template="이것은 {} 이다.")
    expect(panel.locator('[data-testid="stVegaLiteChart"]')).to_be_visible(timeout=RESULT_TIMEOUT_MS)


def test_text_file_uploaded_as_an_image_is_an_error_and_the_app_keeps_working(tour, upload_files):
    panel = tour.tab(TABS[1])
    panel.get_by_text("Upload", exact=True).click()
    tour.upload(panel, upload_files["text"])
    error = panel.locator('[data-testid="stAlert"]')
    expect(error).to_contain_text("notes.txt is not an image this app can read (not a recognised image format)")
    expect(error).to_contain_text("Upload a PNG, JPEG, GIF, WebP or BMP file")
    # Classifying now says there is no image, then a real picture works in the same session.
    panel.get_by_role("button", name="Classify").click()
    expect(panel.get_by_text("Choose an image first")).to_be_visible()
    panel = tour.classify(upload_files["image"], ["빨간 원", "파란 네모"])
    expect(panel.locator('[data-testid="stVegaLiteChart"]')).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(panel.get_by_text("not an image")).to_have_count(0)


@pytest.mark.parametrize("mode,grid", [("crops", 2), ("tokens", 3)])
def test_text_to_patch_shows_the_overlay_and_ranked_cells(tour, upload_files, tiny_ckpt_dir, mode, grid):
    from koclip.query import rank_patches

    panel = tour.rank_patches(upload_files["image"], "빨간 원", mode=mode, grid=grid)
    overlay = panel.locator('[data-testid="stImage"]').filter(has_text=f"“빨간 원”: {grid}×{grid} cells by {mode}")
    expect(overlay).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(overlay.locator("img")).to_have_js_property("naturalWidth", 120)  # the uploaded picture's size
    ranking = rank_patches("빨간 원", upload_files["image"].read_bytes(), grid=(grid, grid), mode=mode,
                           model=tiny_ckpt_dir)
    expected = [f"{c['rank']} · {c['score']:.3f}" for c in ranking.cells()[:8]]
    captions = panel.locator('[data-testid="stImageCaption"]')
    expect(captions).to_have_count(2 + len(expected))  # the preview's, the overlay's, then the ranked cells'
    assert captions.all_inner_texts()[2:] == expected


def test_model_and_index_are_loaded_once_per_server(server, browser):
    for _ in range(2):  # two visitors, two sessions
        context = browser.new_context()
        visit = Tour(context.new_page(), server.url)
        visit.open()
        panel = visit.search("노란 세모")
        expect(panel.locator('[data-testid="stImage"]')).to_have_count(12, timeout=RESULT_TIMEOUT_MS)
        context.close()
    log = server.log()
    assert log.count("loading model from") == 1, log
    assert log.count("loading index from") == 1, log


def test_another_models_index_is_refused_until_a_new_version_is_published(
        tiny_ckpt_dir, pictures, tmp_path_factory, browser, artifacts):
    """A mismatched index gets a message naming both models; publishing a version embedded by
    the served model (what a reindex does) is picked up on the next page load, no restart."""
    from koclip.checkpoint import load_checkpoint
    from koclip.cli.main import main as koclip_main
    from koclip.index import build_index

    root = tmp_path_factory.mktemp("swap")
    other = str(root / "other-model")
    assert koclip_main(["init", other, "--tiny", "tiny-bert-clip", "--seed", "1"]) == 0
    index = str(root / "index")
    build_index(embed_store(tiny_ckpt_dir, pictures, root / "by-tiny"), index, kind="flat")
    with AppServer(index, other, artifacts / "server-swap.log") as server:
        page = browser.new_page()
        page.goto(server.url)
        alert = page.locator('[data-testid="stAlert"]')
        expect(alert).to_contain_text("Cannot serve this index with this model", timeout=RESULT_TIMEOUT_MS)
        expect(alert).to_contain_text(load_checkpoint(other).fingerprint)
        expect(alert).to_contain_text(load_checkpoint(tiny_ckpt_dir).fingerprint)
        expect(page.get_by_role("tab")).to_have_count(0)
        page.screenshot(path=str(artifacts / "test_another_models_index_is_refused.png"))

        version = build_index(embed_store(other, pictures, root / "by-other"), index, kind="flat").path
        visit = Tour(page, server.url)
        visit.open()
        expect(page.get_by_text(version)).to_be_visible()  # the sidebar names the version served
        panel = visit.search("빨간 원")
        expect(panel.locator('[data-testid="stImage"]')).to_have_count(12, timeout=RESULT_TIMEOUT_MS)
        page.close()
    log = server.log()
    assert log.count("loading model from") == 1 and log.count("loading index from") == 2, log


# ---------------------------------------------------------------- through a running koclip.serve


class ServiceAppServer(AppServer):
    """`python -m koclip.app --service URL`: searches go to a running koclip.serve."""

    def __init__(self, service_url: str, model: str, log_path, name: str):
        super().__init__("/unused", model, log_path)
        self.service_url, self.name = service_url, name

    def start(self, timeout: float = 60.0) -> "ServiceAppServer":
        command = [sys.executable, "-m", "koclip.app", "--service", self.service_url, "--service-index", self.name,
                   "--model", self.model, "--port", str(self.port), "--host", self.host]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self


@pytest.mark.slow  # a koclip.serve and an app server, about 30 s
def test_the_app_searches_through_a_running_service(app_index, tiny_ckpt_dir, browser, artifacts):
    pytest.importorskip("starlette")
    from koclip.query import search
    from test_serve import ServerProcess, free_port

    service = ServerProcess(["--model", tiny_ckpt_dir, "--index", f"pictures={app_index}", "--poll-seconds", "0"],
                            artifacts / "service.log")
    try:
        service.wait_ready()
        assert app_main(["--service", f"http://127.0.0.1:{free_port()}", "--model", tiny_ckpt_dir]) == 2
        with ServiceAppServer(service.url, tiny_ckpt_dir, artifacts / "server-service.log", "pictures") as app:
            page = browser.new_page()
            visit = Tour(page, app.url)
            visit.open()
            expect(page.get_by_text(service.url, exact=False).first).to_be_visible()
            panel = visit.search("빨간 원", k=6)
            images = panel.locator('[data-testid="stImage"]')
            expect(images).to_have_count(6, timeout=RESULT_TIMEOUT_MS)
            hits = search("빨간 원", k=6, index=app_index, model=tiny_ckpt_dir)
            shown = panel.locator('[data-testid="stImageCaption"]').all_inner_texts()
            assert shown == [f"{h.rank}. {h.captions[0]} · {h.score:.3f}" for h in hits]
            panel = visit.classify(None, ["고양이", "사과"], pick="빨간 원")  # the picker lists the service's items
            expect(panel.get_by_text("Most likely")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            page.screenshot(path=str(artifacts / "test_the_app_searches_through_a_running_service.png"))
            page.close()
        assert "loading index from" not in app.log()
    finally:
        service.stop()
