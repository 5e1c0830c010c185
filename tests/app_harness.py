"""Run the demo app in a subprocess and drive it in headless Chromium.

Used by the browser tests (tests/test_app.py) and, as a script, to take the screenshots of
docs/app.md:

    python tests/app_harness.py docs/screenshots [--index DIR] [--model DIR]

It holds:
- `AppServer`: `python -m koclip.app` on 127.0.0.1 and a free port, ready once
  `/_stcore/health` answers; its output goes to a log file, shown when it fails to start.
- `launch_chromium(playwright)`: Debian's /usr/bin/chromium through Playwright (the browser
  download of `playwright install` is not used).
- `Tour`: the steps a visitor takes on each tab (query, upload, classify, rank patches),
  each ending when the page shows its result, so callers can assert on it or screenshot it.
Waits are on conditions (the health endpoint, elements in the page), never fixed sleeps.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TABS = ("Text → Image", "Image → Text", "Text → Patch")
# A screenshot file name per tab, as docs/app.md shows them.
SCREENSHOT_NAMES = {"Text → Image": "text-to-image.png", "Image → Text": "image-to-text.png",
                    "Text → Patch": "text-to-patch.png"}
RESULT_TIMEOUT_MS = 60_000  # the first query of a server also compiles the model's encoders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python -m koclip.app` in a subprocess; use as a context manager or call start()/stop()."""

    def __init__(self, index: str, model: str, log_path: str | os.PathLike, port: int | None = None,
                 host: str = "127.0.0.1"):
        self.index, self.model, self.host = index, model, host
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "AppServer":
        command = [sys.executable, "-m", "koclip.app", "--index", self.index, "--model", self.model,
                   "--port", str(self.port), "--host", self.host]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll the health endpoint until it says ok; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        health = f"{self.url}/_stcore/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            try:  # the pause between attempts, cut short if the process exits
                self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        raise RuntimeError(f"the app did not answer {health} within {timeout:.0f} s:\n{self.log_tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_chromium(playwright):
    """Headless Debian chromium; raises FileNotFoundError naming the apt package when it is absent."""
    if not os.path.exists(CHROMIUM):
        raise FileNotFoundError(f"{CHROMIUM} not found; install it with `apt-get install chromium`")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def set_slider(slider, value: int) -> None:
    """Move a Streamlit slider (an <input type=range>, role slider) to an integer value with the keyboard."""
    slider.focus()
    slider.press("Home")
    for _ in range(value - int(slider.get_attribute("min"))):
        slider.press("ArrowRight")
    expect_value = str(value)
    if slider.input_value() != expect_value:
        raise AssertionError(f"the slider is at {slider.input_value()}, not {value}")


class Tour:
    """One visitor's steps on the app in a Playwright page; each returns once its result is shown."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url

    def open(self) -> None:
        self.page.goto(self.url)
        # The tab bar is drawn once the script has run past the resource loading.
        self.page.get_by_role("tab", name=TABS[0]).wait_for(timeout=RESULT_TIMEOUT_MS)

    def tab(self, name: str):
        """Select a tab; returns its (visible) panel to scope further locators to."""
        self.page.get_by_role("tab", name=name).click()
        panel = self.page.get_by_role("tabpanel", name=name)
        panel.wait_for()
        return panel

    def search(self, query: str, k: int | None = None):
        panel = self.tab(TABS[0])
        if k is not None:
            set_slider(panel.get_by_role("slider"), k)
        panel.get_by_role("textbox", name="Query", exact=True).fill(query)
        panel.get_by_role("button", name="Search").click()
        return panel

    def screenshot(self, path: str | os.PathLike, max_height: int = 4000) -> None:
        """A PNG of the page down to the end of the selected tab. Streamlit scrolls inside its main
        container, not the document, so the viewport is first made that tall (images loaded first)."""
        self.page.wait_for_function("() => [...document.images].every(img => img.complete)")
        bottom = self.page.evaluate("""() => {
            const main = document.querySelector('[data-testid="stMain"]');
            const panel = [...document.querySelectorAll('[role="tabpanel"]')].find(p => p.offsetParent !== null);
            const last = panel || main || document.body;
            return last.getBoundingClientRect().bottom + (main ? main.scrollTop : 0);
        }""")
        width = self.page.viewport_size["width"]
        self.page.set_viewport_size({"width": width, "height": max(600, min(int(bottom) + 64, max_height))})
        self.page.screenshot(path=str(path))

    def upload(self, panel, path: str | os.PathLike) -> None:
        panel.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))

    def choose_image(self, panel, image: str | os.PathLike | None, pick: str | None = None) -> None:
        """Upload `image`, or (when it is None) use the index picker: the first item whose label
        contains `pick`, else the item already selected."""
        # The page captions the preview (or the error) with the file name or the item's label;
        # waiting for it means the upload or the pick has reached the server.
        shown = panel.locator('[data-testid="stImageCaption"], [data-testid="stAlert"]')
        if image is not None:
            panel.get_by_text("Upload", exact=True).click()
            self.upload(panel, image)
            shown.filter(has_text=Path(image).name).first.wait_for(timeout=RESULT_TIMEOUT_MS)
            return
        panel.get_by_text("From the index", exact=True).click()
        if pick and self.pick(panel, pick):
            shown.filter(has_text=pick).first.wait_for(timeout=RESULT_TIMEOUT_MS)
        shown.first.wait_for(timeout=RESULT_TIMEOUT_MS)

    def pick(self, panel, text: str, timeout_ms: int = 5_000) -> bool:
        """Select the first index item whose label contains `text`; False (selection kept) if none does."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        box = panel.get_by_role("combobox")
        box.click()
        box.fill(text)
        option = self.page.get_by_role("option", name=text).first
        try:
            option.wait_for(timeout=timeout_ms)
        except PlaywrightTimeout:
            box.press("Escape")
            return False
        option.click()
        return True

    def classify(self, image: str | os.PathLike | None, labels: list[str], template: str | None = None,
                 pick: str | None = None):
        """Image → Text with an uploaded file, or with an index item when image is None."""
        panel = self.tab(TABS[1])
        self.choose_image(panel, image, pick)
        panel.get_by_role("textbox", name="Labels (one a line)", exact=True).fill("\n".join(labels))
        if template is not None:
            panel.get_by_role("textbox", name="Template", exact=True).fill(template)
        panel.get_by_role("button", name="Classify").click()
        return panel

    def rank_patches(self, image: str | os.PathLike | None, text: str, mode: str = "crops",
                     pick: str | None = None, grid: int | None = None):
        panel = self.tab(TABS[2])
        self.choose_image(panel, image, pick)
        panel.get_by_role("textbox", name="Text", exact=True).fill(text)
        if grid is not None:
            set_slider(panel.get_by_role("slider"), grid)
        panel.get_by_text(mode, exact=True).click()
        panel.get_by_role("button", name="Rank patches").click()
        return panel


def take_screenshots(out_dir: str | os.PathLike, index: str, model: str, query: str = "빨간 하트",
                     pick: str = "고양이 얼굴", labels: tuple[str, ...] = ("고양이", "강아지", "자동차", "사과", "하트"),
                     patch_text: str = "고양이") -> list[Path]:
    """Start the app, run one example per tab and save a PNG of each; returns the paths.

    The Image → Text and Text → Patch examples use the first index item whose label contains
    `pick` (the emoji-ko sample has "고양이 얼굴", a cat face).
    """
    from playwright.sync_api import expect, sync_playwright

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with AppServer(index, model, out / "server.log") as server, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            tour = Tour(page, server.url)
            tour.open()
            panel = tour.search(query)
            expect(panel.get_by_text("nearest images for")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            written.append(out / SCREENSHOT_NAMES[TABS[0]])
            tour.screenshot(written[-1])

            panel = tour.classify(None, list(labels), pick=pick)
            expect(panel.get_by_text("Most likely:")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(panel.locator('[data-testid="stVegaLiteChart"]')).to_be_visible()
            written.append(out / SCREENSHOT_NAMES[TABS[1]])
            tour.screenshot(written[-1])

            panel = tour.rank_patches(None, patch_text, pick=pick)
            expect(panel.get_by_text("cells by crops")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            written.append(out / SCREENSHOT_NAMES[TABS[2]])
            tour.screenshot(written[-1])
        finally:
            browser.close()
    (out / "server.log").unlink(missing_ok=True)
    return written


def main(argv=None) -> int:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from koclip.data import demo_index_dir, demo_model_dir

    parser = argparse.ArgumentParser(prog="python tests/app_harness.py",
                                     description="Screenshot each tab of the demo app (headless Chromium).")
    parser.add_argument("out", help="folder for the PNGs")
    parser.add_argument("--index", default=demo_index_dir())
    parser.add_argument("--model", default=demo_model_dir())
    args = parser.parse_args(argv)
    for path in take_screenshots(args.out, index=args.index, model=args.model):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
