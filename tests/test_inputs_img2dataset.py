"""The real img2dataset against a loopback HTTP server (test images plus one URL that 404s), in each of
its three output formats, then embedded by the pipeline: exactly the successful downloads are
embedded, the failure is a dead letter with img2dataset's error, and the ids are img2dataset's keys."""
from __future__ import annotations

import functools
import http.server
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koclip import store
from pipelines import embed
from pipelines.inputs import detect_format
from pipelines.transforms.write import read_dead_letters

img2dataset = pytest.importorskip("img2dataset", reason="pip install --no-deps -r requirements-nodeps.txt")

CAPTIONS = ["빨간 사과", "파란 하늘", "초록 나무", "노란 바나나"]


@pytest.fixture(scope="module")
def url_list(tmp_path_factory):
    """A loopback server with four images; the URL list names them and one file it does not have."""
    served = tmp_path_factory.mktemp("served")
    for i in range(len(CAPTIONS)):
        Image.new("RGB", (40, 32), (60 * i, 200 - 40 * i, 90)).save(served / f"{i}.jpg", quality=95)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/0.jpg", f"{base}/1.jpg", f"{base}/missing.jpg", f"{base}/2.jpg", f"{base}/3.jpg"]
    captions = CAPTIONS[:2] + ["없는 그림"] + CAPTIONS[2:]
    path = tmp_path_factory.mktemp("urls") / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    yield str(path), urls
    server.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _download(url_list: str, output: str, output_format: str) -> None:
    img2dataset.download(url_list=url_list, output_folder=output, output_format=output_format, input_format="parquet",
                         url_col="url", caption_col="caption", image_size=32, resize_mode="keep_ratio",
                         processes_count=1, thread_count=2, number_sample_per_shard=3, timeout=5, retries=0,
                         enable_wandb=False, distributor="multiprocessing")


def _sidecar_rows(output: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(output)):
        if name.endswith(".parquet"):
            rows += pq.read_table(os.path.join(output, name), columns=["key", "url", "status", "error_message"]).to_pylist()
    return rows


# webdataset by default; the other two formats in the slow run (each is an img2dataset run and a
# pipeline run: 40-60 s on this machine under load)
@pytest.mark.parametrize("output_format", ["webdataset", pytest.param("parquet", marks=pytest.mark.slow),
                                           pytest.param("files", marks=pytest.mark.slow)])
def test_img2dataset_output_is_embedded_with_its_failure_accounted(url_list, output_format, tiny_ckpt_dir, tmp_path):
    path, urls = url_list
    downloaded = str(tmp_path / output_format)
    _download(path, downloaded, output_format)
    assert detect_format(downloaded) == output_format
    sidecar = {r["url"]: r for r in _sidecar_rows(downloaded)}
    assert set(sidecar) == set(urls)  # img2dataset's own record of every URL
    assert [u for u in urls if sidecar[u]["status"] != "success"] == [urls[2]]

    output = str(tmp_path / "embedded")
    result = embed.run(["--input", downloaded, "--output", output, "--model", tiny_ckpt_dir, "--unit-size", "2",
                        "--batch-size", "4"])
    rows = store.open_store(output).read_table().to_pylist()
    dead = read_dead_letters(output)
    good = [u for u in urls if u != urls[2]]
    assert sorted(r["id"] for r in rows) == sorted(sidecar[u]["key"] for u in good)  # ids = img2dataset's keys
    assert {r["url"]: r["captions"] for r in rows} == {u: [c] for u, c in zip(good, CAPTIONS)}
    assert [(d["id"], d["uri"], d["stage"], d["reason"]) for d in dead] == [
        (sidecar[urls[2]]["key"], urls[2], "listing", "failed_to_download")]
    assert "404" in dead[0]["message"] and dead[0]["message"] == sidecar[urls[2]]["error_message"]
    assert result.totals["rows"] == len(urls) == result.totals["embedded"] + result.totals["dead_letters"]
    if output_format == "webdataset":
        assert all(".tar#" in r["uri"] for r in rows)
    elif output_format == "parquet":
        assert all(".parquet#row=" in r["uri"] for r in rows)
    else:
        assert all(os.path.exists(r["uri"]) for r in rows)
