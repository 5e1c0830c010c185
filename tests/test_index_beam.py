"""The distributed ivfpq build (real Beam, FnApiRunner) and the `python -m pipelines.index` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.index import clustered_vectors  # noqa: E402
from koclip import fs  # noqa: E402
from koclip.index import build_index, extend_index, list_versions, load_index  # noqa: E402
from koclip.index.tuning import set_search_params  # noqa: E402
from koclip.store import Row, rows_to_table, write_shard  # noqa: E402
from pipelines.index import main  # noqa: E402
from pipelines.index_beam import build_distributed  # noqa: E402

DIM = 32


def vectors(n: int, seed: int) -> np.ndarray:
    return clustered_vectors(n, DIM, centres=64, intrinsic_dim=8, seed=seed)


def write_store(root: str, items: int, sizes: list[int], captions: int = 2) -> str:
    """`items` items in shards of the given sizes; each caption has its own vector."""
    images, texts = vectors(items, 0), vectors(items * captions, 1).reshape(items, captions, DIM)
    rows = [Row(f"item{i}", f"gs://images/{i}.png", "0" * 64, 8, 8, [f"caption {i}.{c}" for c in range(captions)],
                images[i], texts[i]) for i in range(items)]
    assert sum(sizes) == items
    start = 0
    for s, size in enumerate(sizes):
        write_shard(fs.join(root, f"shard-{s:05d}.parquet"),
                    rows_to_table(rows[start:start + size], "model-a", {"projection_dim": DIM}, DIM))
        start += size
    return root


def caption_vectors(ids: list[str]) -> np.ndarray:
    """The vector of each caption row id "item{i}#{c}" of write_store's stores (2 captions per item)."""
    texts = vectors(5000, 1)
    return texts[[2 * int(i[4:].split("#")[0]) + int(i.split("#")[1]) for i in ids]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):  # 2 captions per item: 5000 caption rows in uneven shards
    return write_store(str(tmp_path_factory.mktemp("store")), 2500, [700, 1100, 0, 300, 400])


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, store):
    root = str(tmp_path_factory.mktemp("dist") / "idx")
    return build_distributed(store, root, column="caption_embeddings", queries=300)


def test_distributed_build_equals_the_single_process_build(tmp_path, store, distributed):
    meta = distributed.meta
    assert meta["layout"] == "ondisk" and meta["kind"] == "ivfpq" and meta["count"] == 5000
    assert sorted(os.listdir(distributed.path)) == ["index.faiss", "index.ivfdata", "meta.json", "rows.parquet",
                                                    "trained.faiss"]  # the per-shard work files are gone
    single = build_index(store, str(tmp_path / "single"), column="caption_embeddings", queries=300,
                         trained=fs.join(distributed.path, "trained.faiss"))
    # the same quantizer, the same rows and tuning queries: the same tuning
    assert single.meta["search_params"] == meta["search_params"]
    assert single.meta["recall_at_10"] == meta["recall_at_10"] and meta["target_reached"]
    a, b = load_index(distributed.root), load_index(single.root)
    assert a.ids == b.ids and sorted(a.ids) == sorted(f"item{i}#{c}" for i in range(2500) for c in (0, 1))
    queries = vectors(200, seed=5)
    for params in (meta["search_params"], {"nprobe": 1, "k_factor": 1}, {"nprobe": 64, "k_factor": 8}):
        set_search_params(a.faiss, params)
        set_search_params(b.faiss, params)
        (sa, ra), (sb, rb) = a.search(queries, 10), b.search(queries, 10)
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(sa, sb)
    set_search_params(a.faiss, {"nprobe": 4096, "k_factor": 32})  # exhaustive: every row where its id says
    _, rows = a.search(caption_vectors(a.ids), 1)
    assert (rows[:, 0] == np.arange(5000)).all()


def test_distributed_build_publishes_on_gcs(gcs_bucket, store, distributed):
    root = f"{gcs_bucket}/idx"
    result = build_distributed(store, root, column="caption_embeddings", queries=300,
                               trained=fs.join(distributed.path, "trained.faiss"))
    assert list_versions(root) == [result.version]
    index = load_index(root)  # the on-disk inverted lists are fetched next to a local index.faiss
    local = load_index(distributed.root)
    queries = vectors(50, seed=6)
    np.testing.assert_array_equal(index.search(queries, 5)[1], local.search(queries, 5)[1])


def test_a_distributed_index_can_be_extended(tmp_path, store, distributed):
    import shutil

    root = str(tmp_path / "idx")
    shutil.copytree(distributed.root, root)
    result = extend_index(root, remove=["item0", "item5"])
    assert result.meta["layout"] == "single" and result.meta["parent"] == distributed.version
    index = load_index(root)
    assert index.count == 4996 and not {"item0#0", "item0#1", "item5#0", "item5#1"} & set(index.ids)
    set_search_params(index.faiss, {"nprobe": 4096, "k_factor": 32})
    _, rows = index.search(caption_vectors(index.ids), 1)
    assert (rows[:, 0] == np.arange(4996)).all()


# ---------------------------------------------------------------- CLI


def test_cli_indexes_the_demo_embeddings_by_default(tmp_path, monkeypatch, capsys):
    from koclip.data import demo_embeddings_dir, demo_index_dir

    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "cache"))
    write_store(demo_embeddings_dir(), 300, [100, 200])
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "published version" in out and "flat" in out and "recall@10  1.0000" in out
    assert demo_index_dir() in out and load_index(demo_index_dir()).count == 300
    assert main(["--column", "caption_embeddings", "--json", "--keep", "1"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["column"] == "caption_embeddings" and meta["count"] == 600
    assert list_versions(demo_index_dir()) == [meta["version"]]


@pytest.mark.parametrize("argv, message", [
    (["--embeddings", "{tmp}/nowhere"], "embedding folder not found: {tmp}/nowhere; make it with "
                                        "`python -m pipelines.embed`"),
    (["--embeddings", "{tmp}", "--runner=DataflowRunner"], "Beam options need --distributed"),
    (["--embeddings", "{tmp}", "--kind", "hnsw", "--distributed"], "--distributed builds ivfpq indexes, not hnsw"),
    (["--embeddings", "{tmp}", "--max-memory", "lots"], "cannot read memory size 'lots'"),
    (["--embeddings", "{tmp}", "--target-recall", "1.5"], "--target-recall must be in (0, 1]"),
    (["--embeddings", "{tmp}"], "no embedding shards"),
])
def test_cli_usage_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv + ["--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipelines.index: error: ") and message.format(tmp=tmp_path) in err
    assert "\n" not in err


def test_cli_runs_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipelines.index", "--embeddings", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"pipelines.index: error: embedding folder not found: "
                                                f"{tmp_path / 'none'}; make it with `python -m pipelines.embed`"]
    help_ = subprocess.run([sys.executable, "-m", "pipelines.index", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "--max-memory" in help_.stdout and "--distributed" in help_.stdout
