"""python -m koclip.serve as a real server: two subprocesses on 127.0.0.1, queried with httpx.

Server A (the default tests): micro-batching, an image and a caption index under one name (and
the image index alone under another), small limits, and an index root `swap` that the tests
publish new versions to while it serves (the hot swap). Server B (the slow tests): batching off,
image_url fetching allowed, a 3 s request timeout. The model is a tiny random one
(conftest's tiny_ckpt_dir); expected answers come from koclip.query.search in this process over
the same index files, never from the server's own code.
"""
from __future__ import annotations

import base64
import http.server
import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from koclip import query  # noqa: E402
from koclip.serve.sample import make_sample, write_images, write_store  # noqa: E402

READY_TIMEOUT = 180.0  # a server compiling on a shared 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: pathlib.Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "koclip.serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                try:  # the pause between attempts, and the check for an early exit
                    self.proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
        raise RuntimeError(f"server not ready in {READY_TIMEOUT}s:\n{self.log_path.read_text()}")

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def model(tiny_ckpt_dir):
    return query.load_model(tiny_ckpt_dir, batch_size=16)


@pytest.fixture(scope="module")
def sample(tmp_path_factory, tiny_ckpt_dir, model):
    return make_sample(str(tmp_path_factory.mktemp("serve-sample")), items=40, model_dir=tiny_ckpt_dir,
                       query_model=model)


@pytest.fixture(scope="module")
def swap_root(tmp_path_factory, sample):
    root = tmp_path_factory.mktemp("swap") / "images"
    shutil.copytree(sample.image_index, root)
    return str(root)


@pytest.fixture(scope="module")
def server_a(tmp_path_factory, sample, swap_root):
    """Micro-batching (batch shapes 1 and 4: fewer compiles at start-up), small limits, image_url
    refused (the default), `swap` polled for new versions."""
    server = ServerProcess(["--model", sample.model, "--index", f"emoji={sample.image_index}",
                            "--index", f"emoji={sample.caption_index}", "--index", f"pictures={sample.image_index}",
                            "--index", f"swap={swap_root}", "--max-batch", "4", "--max-body", "256KB", "--max-num-images", "30",
                            "--max-result-ids", "100", "--poll-seconds", "0.2"],
                           tmp_path_factory.mktemp("serve-logs") / "a.log")
    with server:
        yield server


@pytest.fixture(scope="module")
def server_b(tmp_path_factory, sample):
    """Batching off, image_url fetched, a 3 s request timeout (the slow tests' server)."""
    server = ServerProcess(["--model", sample.model, "--index", f"emoji={sample.image_index}", "--no-batching",
                            "--allow-image-url", "--request-timeout", "3", "--max-body", "256KB", "--poll-seconds", "0"],
                           tmp_path_factory.mktemp("serve-logs") / "b.log")
    with server:
        yield server


@pytest.fixture(scope="module")
def a(server_a):
    with httpx.Client(base_url=server_a.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def b(server_b):
    with httpx.Client(base_url=server_b.url, timeout=30) as client:
        yield client


def knn(client, **body):
    body.setdefault("indice_name", "emoji")
    body.setdefault("num_images", 5)  # clip_back's default, 40, is over server A's cap
    return client.post("/knn-service", json=body)


def ids(answer) -> list[str]:
    return [hit["id"] for hit in answer]


def b64(path) -> str:
    return base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def metric(client, name: str, **labels) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------- the endpoints


def test_indices_health_ready_and_metrics(a, sample):
    assert a.get("/indices-list").json() == ["emoji", "pictures", "swap"]
    assert a.get("/healthz").json() == {"status": "ok"}
    ready = a.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["batching"]
    assert ready.json()["batch_shapes"] == [1, 2, 4]
    served = {(i["name"], i["modality"]): i for i in ready.json()["indexes"]}
    assert set(served) == {("emoji", "image"), ("emoji", "text"), ("pictures", "image"), ("swap", "image")}
    assert served[("emoji", "image")]["rows"] == 40 and served[("emoji", "text")]["rows"] == 80
    metrics = a.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    version = served[("emoji", "image")]["version"]
    assert f'koclip_index_info{{index="emoji",modality="image",version="{version}"}} 1.0' in metrics.text
    assert metric(a, "koclip_ready") == 1.0
    assert metric(a, "koclip_requests_total", endpoint="indices-list", status="200") >= 1


def test_text_query_answers_as_koclip_query(a, sample, model):
    for text in ("빨간 사과", "고양이 사진", sample.captions[7][0]):
        answer = knn(a, text=text, modality="image", num_images=8)
        assert answer.status_code == 200
        expected = query.search(text, k=8, index=sample.image_index, model=model)
        assert ids(answer.json()) == [h.id for h in expected]
        np.testing.assert_allclose([h["similarity"] for h in answer.json()], [h.score for h in expected], atol=1e-5)
        first = answer.json()[0]
        assert set(first) >= {"id", "similarity", "url", "caption"}
        assert first["url"] == expected[0].uri and first["caption"] == expected[0].captions[0]


def test_image_and_vector_queries(a, sample, model):
    answer = knn(a, image=b64(sample.images[5]), num_images=3).json()
    assert answer[0]["id"] == "item0005" and answer[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    vector = model.embed_images([pathlib.Path(sample.images[9])])[0]
    answer = knn(a, embedding_input=(vector * 2).tolist(), num_images=5).json()
    assert ids(answer) == [h.id for h in query.search(vector, k=5, index=sample.image_index)]
    assert answer[0]["id"] == "item0009"


def test_text_modality_searches_the_caption_index(a, sample, model):
    caption = sample.captions[3][1]
    answer = knn(a, text=caption, modality="text", num_images=4).json()
    expected = query.search(caption, k=4, index=sample.caption_index, model=model)
    assert ids(answer) == [h.id for h in expected]
    assert all(hit["id"].split("#")[0] == hit["item_id"] for hit in answer)
    by_id = {h.id: h for h in expected}
    assert all(hit["caption"] == by_id[hit["id"]].captions[0] for hit in answer)


def test_deduplicate_min_similarity_and_result_counts(a, sample, model):
    text = "빨간 사과"
    plain = query.search(text, k=20, index=sample.caption_index, model=model)
    deduped = query.search(text, k=20, index=sample.caption_index, model=model, dedup=0.94)
    assert len(deduped) < len(plain)  # the tiny vocabulary makes near-identical captions
    answer = knn(a, text=text, modality="text", num_images=20, deduplicate=True).json()
    assert ids(answer) == [h.id for h in deduped]
    answer = knn(a, text=text, modality="text", num_images=5, num_result_ids=20, deduplicate=True).json()
    assert ids(answer) == [h.id for h in deduped[:5]]  # clip_back: dedup the candidates, then cut
    answer = knn(a, text=text, modality="text", num_images=20, deduplicate=0.99).json()
    assert ids(answer) == [h.id for h in query.search(text, k=20, index=sample.caption_index, model=model, dedup=0.99)]

    threshold = query.search(text, k=12, index=sample.image_index, model=model)[-1].score
    ranged = query.search(text, k=None, index=sample.image_index, model=model, min_score=threshold)
    answer = knn(a, text=text, num_images=30, num_result_ids=100, min_similarity=threshold).json()
    assert ids(answer) == [h.id for h in ranged] and len(answer) >= 12
    assert all(h["similarity"] >= threshold for h in answer)
    assert knn(a, text=text, num_images=30, num_result_ids=100, min_similarity=1.5).json() == []
    assert len(knn(a, text=text, num_images=3, num_result_ids=1).json()) == 1


def test_metadata(a, sample):
    answer = a.post("/metadata", json={"ids": ["item0002", "item0002#1", "missing", 3], "indice_name": "emoji"})
    assert answer.status_code == 200
    first, caption, missing, by_row = answer.json()
    assert first == {"id": "item0002", "metadata": {"url": sample.images[2], "caption": sample.captions[2][0],
                                                    "captions": sample.captions[2], "item_id": "item0002"}}
    assert caption["metadata"]["caption"] == sample.captions[2][1] and caption["metadata"]["item_id"] == "item0002"
    assert missing == {"id": "missing", "metadata": None}
    assert by_row["id"] == 3 and by_row["metadata"]["url"].startswith(os.path.dirname(sample.images[0]))
    assert a.post("/metadata", json={"ids": [], "indice_name": "emoji"}).json() == []


def test_concurrent_queries_are_batched_and_each_answered_right(a, sample, model):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"{c} {t}" for c in ("빨간", "파란", "노란", "초록") for t in ("사과", "고양이", "꽃", "바다", "의자", "하늘")]
    expected = {t: [h.id for h in hits] for t, hits in
                zip(texts, query.search(texts, k=5, index=sample.image_index, model=model))}
    calls_before = metric(a, "koclip_batch_size_count")
    searches_before = metric(a, "koclip_search_batch_size_count")
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda t: (t, knn(a, text=t, num_images=5)), texts * 2))
    assert all(r.status_code == 200 and ids(r.json()) == expected[t] for t, r in answers)
    calls = metric(a, "koclip_batch_size_count") - calls_before
    assert calls < len(answers)  # some encoder calls embedded several queries
    searches = metric(a, "koclip_search_batch_size_count") - searches_before
    assert searches < len(answers)  # and some FAISS calls searched several
    # compiled in the warm-up only: one per (batch shape 1, 2, 4) x (length bucket 8, 16, 32)
    assert metric(a, "koclip_encoder_compiles", tower="text") == 9


# ---------------------------------------------------------------- bad requests


def _png(size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def _bomb() -> str:  # 9000 x 9000 = 81M pixels (over the pipeline's 8192^2) in ~10 KB of PNG
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode()


BAD_KNN = [
    ("not json", b"{text: 1", 400, "bad_json"),
    ("json nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400, "bad_json"),
    ("not utf-8", b"\xff\xfe{}", 400, "bad_json"),
    ("not an object", [1, 2], 400, "bad_request"),
    ("no query", {"num_images": 3}, 400, "no_query"),
    ("two queries", {"text": "사과", "embedding_input": [1.0] * 16}, 400, "several_queries"),
    ("blank text", {"text": "   "}, 400, "bad_text"),
    ("text not a string", {"text": 5}, 400, "bad_text"),
    ("text too long", {"text": "가" * 2001}, 400, "bad_text"),
    ("image not base64", {"image": "%%%not base64%%%"}, 400, "bad_image"),
    ("image not an image", {"image": base64.b64encode(b"hello, not a picture").decode()}, 400, "bad_image"),
    ("image truncated", {"image": base64.b64encode(_png()[:60]).decode()}, 400, "bad_image"),
    ("image bomb", {"image": _bomb()}, 413, "too_many_pixels"),
    ("embedding of the wrong size", {"embedding_input": [0.1] * 5}, 400, "bad_embedding"),
    ("embedding of zeros", {"embedding_input": [0.0] * 16}, 400, "bad_embedding"),
    ("embedding with text", {"embedding_input": ["a"] * 16}, 400, "bad_field"),
    ("embedding not a list", {"embedding_input": {"x": 1}}, 400, "bad_embedding"),
    ("modality", {"text": "사과", "modality": "video"}, 400, "bad_field"),
    ("num_images zero", {"text": "사과", "num_images": 0}, 400, "bad_field"),
    ("num_images text", {"text": "사과", "num_images": "5"}, 400, "bad_field"),
    ("num_images bool", {"text": "사과", "num_images": True}, 400, "bad_field"),
    ("num_images over the cap", {"text": "사과", "num_images": 31}, 400, "too_many_results"),
    ("num_result_ids over the cap", {"text": "사과", "num_result_ids": 101}, 400, "too_many_results"),
    ("deduplicate", {"text": "사과", "deduplicate": "yes"}, 400, "bad_field"),
    ("min_similarity", {"text": "사과", "min_similarity": "high"}, 400, "bad_field"),
    ("indice_name", {"text": "사과", "indice_name": 7}, 400, "bad_field"),
    ("image_url scheme", {"image_url": "file:///etc/passwd"}, 400, "bad_image_url"),
    ("safety model", {"text": "사과", "use_safety_model": True}, 422, "unsupported_filter"),
    ("violence detector", {"text": "사과", "use_violence_detector": True}, 422, "unsupported_filter"),
    ("mclip", {"text": "사과", "use_mclip": True}, 422, "unsupported_filter"),
    ("aesthetic", {"text": "사과", "aesthetic_score": 9, "aesthetic_weight": 0.5}, 422, "unsupported_filter"),
    ("flag not a bool", {"text": "사과", "use_safety_model": "no"}, 400, "bad_field"),
    ("unknown index", {"text": "사과", "indice_name": "nope"}, 404, "unknown_index"),
    ("no caption index", {"text": "사과", "indice_name": "pictures", "modality": "text"}, 404, "unknown_index"),
]


@pytest.mark.parametrize("case, body, status, kind", BAD_KNN, ids=[c[0] for c in BAD_KNN])
def test_bad_knn_requests_get_a_4xx_json_answer(a, case, body, status, kind):
    if isinstance(body, bytes):
        answer = a.post("/knn-service", content=body)
    else:
        body = {"indice_name": "emoji", "num_images": 5, **body} if isinstance(body, dict) else body
        answer = a.post("/knn-service", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == kind and answer.json()["message"]


def test_other_bad_requests(a):
    too_big = a.post("/knn-service", json={"indice_name": "emoji", "text": "사과" * 10, "pad": "x" * 300_000})
    assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"
    for body, status, kind in (({"ids": "item1"}, 400, "bad_field"), ({"ids": [None]}, 400, "bad_field"),
                               ({"ids": ["item1"], "indice_name": "nope"}, 404, "unknown_index")):
        answer = a.post("/metadata", json=body)
        assert (answer.status_code, answer.json()["error"]) == (status, kind)
    assert a.get("/knn-service").status_code == 405 and a.get("/knn-service").json()["error"] == "method_not_allowed"
    assert a.get("/no/such/route").status_code == 404 and a.get("/no/such/route").json()["error"] == "no_such_route"
    assert metric(a, "koclip_errors_total", kind="unsupported_filter") >= 4
    assert metric(a, "koclip_requests_total", endpoint="knn-service", status="500") == 0
    assert a.get("/healthz").status_code == 200  # still up after all of them


# ---------------------------------------------------------------- image_url


class _Images(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.end_headers()
        self.wfile.write(data or b"not found")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host(sample):
    _Images.files = {"/five.png": pathlib.Path(sample.images[5]).read_bytes(), "/big.bin": b"\0" * 300_000}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    silent = socket.socket()  # accepts connections and never answers: a stuck upstream
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    yield f"http://127.0.0.1:{httpd.server_address[1]}", f"http://127.0.0.1:{silent.getsockname()[1]}"
    httpd.shutdown()
    silent.close()


def test_image_url_is_refused_by_default(a, image_host):
    host, _ = image_host
    refused = knn(a, image_url=host + "/five.png")
    assert refused.status_code == 422 and refused.json()["error"] == "image_url_disabled"


@pytest.mark.slow  # a second server (about 30 s to start on a shared 2-core machine)
def test_image_url_is_fetched_when_allowed(b, image_host):
    host, _ = image_host
    answer = knn(b, image_url=host + "/five.png", num_images=2)
    assert answer.status_code == 200 and answer.json()[0]["id"] == "item0005"
    missing = knn(b, image_url=host + "/missing.png")
    assert missing.status_code == 400 and missing.json()["error"] == "image_url_failed"
    big = knn(b, image_url=host + "/big.bin")
    assert big.status_code == 413 and big.json()["error"] == "too_large"


@pytest.mark.slow
def test_a_stuck_request_times_out_and_the_server_goes_on(b, image_host):
    _, silent = image_host
    started = time.monotonic()
    answer = knn(b, image_url=silent + "/never.png")
    assert answer.status_code == 503 and answer.json()["error"] == "timeout"
    assert 2.5 < time.monotonic() - started < 20  # the server's --request-timeout is 3 s
    assert knn(b, text="사과", num_images=1).status_code == 200
    assert metric(b, "koclip_errors_total", kind="timeout") == 1


@pytest.mark.slow
def test_batching_off_answers_as_batching_on(a, b, sample, model):
    for text in ("노란 꽃", "강아지 사진"):
        expected = [h.id for h in query.search(text, k=6, index=sample.image_index, model=model)]
        on = knn(a, text=text, num_images=6).json()
        off = knn(b, text=text, num_images=6).json()
        assert ids(on) == ids(off) == expected
        np.testing.assert_allclose([h["similarity"] for h in on], [h["similarity"] for h in off], atol=1e-5)
    assert metric(b, "koclip_batch_size_bucket", le="1.0") == metric(b, "koclip_batch_size_count") > 0
    assert metric(b, "koclip_search_batch_size_count") == 0  # batching off: each query searched alone


def test_a_batched_search_answers_each_query_as_it_would_alone(sample, model):
    from koclip import index as koclip_index
    from koclip.serve.app import BLAS_FROM, matrix_product_search
    from koclip.serve.service import Served, Service

    served = Served("s", "image", sample.image_index, koclip_index.load_index(sample.image_index))
    vectors = model.embed_texts([f"{c} {t}" for c in ("빨간", "파란") for t in ("사과", "고양이", "꽃")])
    sizes = [3, 5, 1, 8, 4, 2]  # num_images differs within a batch
    assert len(vectors) >= BLAS_FROM  # the batch is searched as one matrix product
    for num_result_ids, dedup, min_similarity in ((8, None, None), (12, 0.5, None), (20, None, 0.0)):
        alone = [Service.knn(served, v, n, num_result_ids, dedup, min_similarity) for v, n in zip(vectors, sizes)]
        with matrix_product_search(len(vectors)):
            together = Service.knn_batch(served, vectors, sizes, num_result_ids, dedup, min_similarity)
        assert [ids(x) for x in together] == [ids(x) for x in alone]
        assert [len(x) for x in together] == [min(n, len(x)) for n, x in zip(sizes, alone)]
        for x, y in zip(together, alone):
            assert [h["url"] for h in x] == [h["url"] for h in y]
            np.testing.assert_allclose([h["similarity"] for h in x], [h["similarity"] for h in y], atol=1e-5)


# ---------------------------------------------------------------- ClipClient


def _clip_client_module():
    """clip-retrieval's clip_client.py, unchanged. The package's __init__ imports clip_back (flask,
    torch, ...), which a --no-deps install lacks, so the module is loaded from its file."""
    import importlib.util

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None:
        pytest.skip("pip install --no-deps clip-retrieval==2.45.0 (requirements-nodeps.txt)")
    path = os.path.join(spec.submodule_search_locations[0], "clip_client.py")
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_retrieval_clip_client_queries_the_service(server_a, sample, model):
    clip_client = _clip_client_module()
    url = server_a.url + "/knn-service"
    client = clip_client.ClipClient(url, indice_name="emoji", num_images=6, deduplicate=False, use_safety_model=False,
                                    use_violence_detector=False, aesthetic_weight=0)
    results = client.query(text="빨간 사과")
    assert ids(results) == [h.id for h in query.search("빨간 사과", k=6, index=sample.image_index, model=model)]
    assert all(set(r) >= {"id", "similarity", "url", "caption"} for r in results)
    by_image = client.query(image=sample.images[11])  # ClipClient reads and base64-encodes the file
    assert by_image[0]["id"] == "item0011"
    by_vector = client.query(embedding_input=model.embed_images([pathlib.Path(sample.images[4])])[0].tolist())
    assert by_vector[0]["id"] == "item0004"
    captions = clip_client.ClipClient(url, indice_name="emoji", modality=clip_client.Modality.TEXT, num_images=4,
                                      use_safety_model=False, use_violence_detector=False, aesthetic_weight=0)
    assert all("#" in r["id"] for r in captions.query(text="고양이 사진"))
    # ClipClient's defaults ask for the safety model and violence detector: refused, never unfiltered
    refused = clip_client.ClipClient(url, indice_name="emoji").query(text="빨간 사과")
    assert refused["error"] == "unsupported_filter"


# ---------------------------------------------------------------- hot swap


def _publish_more(sample, model, swap_root: str, tmp_path, first: int, items: int) -> None:
    """A new version of swap_root: the sample's items plus `items` new ones."""
    from koclip.index import build_index

    store = tmp_path / f"store-{first}"
    shutil.copytree(sample.store, store)
    paths, captions = write_images(str(tmp_path / f"images-{first}"), items, seed=first)
    write_store(str(store), model, paths, captions, first=first)
    build_index(str(store), swap_root, kind="flat", queries=10)


def _wait_for(condition, timeout: float = 60.0) -> None:
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        done.wait(0.05)  # the pause between polls of the server's state


def swap_entry(client) -> dict:
    return next(i for i in client.get("/readyz").json()["indexes"] if i["name"] == "swap")


def test_hot_swap_under_load_fails_no_request(a, server_a, sample, swap_root, tmp_path, model):
    before = swap_entry(a)
    assert before["rows"] == 40
    vectors = model.embed_images([pathlib.Path(p) for p in sample.images[:8]])
    stop, failures, answered, lock = threading.Event(), [], [0], threading.Lock()

    def load(worker: int):
        with httpx.Client(base_url=server_a.url, timeout=30) as client:
            n = 0
            while not stop.is_set():
                body = ({"text": ("빨간 사과", "고양이")[n % 2]} if (n + worker) % 2 else
                        {"embedding_input": vectors[n % 8].tolist()})
                try:
                    answer = client.post("/knn-service", json={"indice_name": "swap", "num_images": 3, **body})
                    if answer.status_code != 200 or len(answer.json()) != 3:
                        failures.append((answer.status_code, answer.text[:200]))
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                with lock:
                    answered[0] += 1
                n += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for w in workers:
        w.start()
    try:
        _publish_more(sample, model, swap_root, tmp_path, first=100, items=8)
        _wait_for(lambda: swap_entry(a)["rows"] == 48)
        count_at_swap = answered[0]
        _wait_for(lambda: answered[0] > count_at_swap + 20)  # and the load goes on against the new version
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert failures == [] and answered[0] > 40
    after = swap_entry(a)
    assert after["version"] > before["version"]
    assert metric(a, "koclip_index_swaps_total", index="swap", modality="image") == 1
    assert f'koclip_index_info{{index="swap",modality="image",version="{after["version"]}"}} 1.0' in a.get("/metrics").text
    new_item = model.embed_images([pathlib.Path(tmp_path / "images-100" / "item0003.png")])[0]
    answer = knn(a, indice_name="swap", embedding_input=new_item.tolist(), num_images=1)
    assert answer.json()[0]["id"] == "item0103"


def test_a_version_of_another_model_is_refused_and_the_old_one_served(a, swap_root, tmp_path):
    from koclip.index import build_index
    from koclip.store import Row, rows_to_table, write_shard

    served = swap_entry(a)
    rng = np.random.default_rng(0)
    rows = [Row(f"x{i}", f"/x/{i}.png", "0" * 64, 8, 8, ["x"], v / np.linalg.norm(v), (v / np.linalg.norm(v))[None])
            for i, v in enumerate(rng.normal(size=(12, 16)).astype(np.float32))]
    store = tmp_path / "other-model"
    write_shard(str(store / "shard-00000.parquet"), rows_to_table(rows, "another-model", {"projection_dim": 16}, 16))
    build_index(str(store), swap_root, kind="flat", queries=3)  # CURRENT now names another model's index
    _wait_for(lambda: metric(a, "koclip_index_reload_failures") == 1)
    assert swap_entry(a) == served
    answer = knn(a, indice_name="swap", text="사과", num_images=2)
    assert answer.status_code == 200 and all(h["id"].startswith("item") for h in answer.json())
