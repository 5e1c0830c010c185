"""jobs.dedup on real Parquet stores and real FAISS: planted duplicates must all be found, nothing
else grouped; exact duplicates by sha256; the outputs; the CLI; the Beam search.

The stores hold random unit vectors (D=64: two random ones have cosine ~N(0, 0.125), far below the
0.95 threshold) with planted copies at cosine >= 0.96 and near misses at 0.80-0.90
(bench.dedup.plant); the expected groups are the planted ones, known before the job runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.dedup import found_groups, pair_scores, plant, write_vectors_store  # noqa: E402
from jobs.dedup import find_duplicates, main, write_outputs  # noqa: E402
from koclip import fs  # noqa: E402
from koclip.data.manifest import iter_manifest  # noqa: E402
from koclip.store import open_store  # noqa: E402

DIM = 64


def random_unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    vectors, groups, misses = plant(random_unit(2900, 0), groups=60, near_misses=30, seed=1)
    sha = [f"{i:064x}" for i in range(len(vectors))]
    for a, b in [(5, 17), (40, 2000)]:  # the same bytes: exact duplicates, whatever their vectors
        sha[b] = sha[a]
    root = write_vectors_store(str(tmp_path_factory.mktemp("planted")), vectors, shards=4, sha256=sha)
    return root, vectors, groups, misses


def expected_groups(groups: list[list[int]], exact: list[tuple[int, int]]) -> list[list[int]]:
    merged = [set(g) for g in groups]
    for a, b in exact:
        touching = [g for g in merged if a in g or b in g]
        merged = [g for g in merged if g not in touching] + [set().union({a, b}, *touching)]
    return sorted(sorted(g) for g in merged)


@pytest.mark.parametrize("exact_max_rows", [10**6, 0], ids=["exact", "ivf"])
def test_every_planted_duplicate_is_found_and_nothing_else(planted, exact_max_rows):
    root, vectors, groups, misses = planted
    result = find_duplicates(open_store(root), 0.95, exact_max_rows=exact_max_rows, nprobe=16)
    found = sorted(sorted(g) for g in found_groups(result))
    assert found == expected_groups(groups, [(5, 17), (40, 2000)])  # a missed planted copy fails here
    assert pair_scores(found, groups)["pair_recall"] == 1.0
    assert not any(a in g and b in g for g in found for a, b in misses)  # below the threshold: apart
    assert result.summary["method"].startswith("exact" if exact_max_rows else "ivf (IVF")
    assert result.summary["exact_pairs"] == 2 and result.summary["items"] == len(vectors)


def test_groups_name_their_first_item_and_similarities_are_the_vectors(planted, tmp_path):
    root, vectors, groups, _ = planted
    result = find_duplicates(open_store(root), 0.95)
    table = result.groups.to_pylist()
    by_group: dict[int, list[dict]] = {}
    for row in table:
        by_group.setdefault(row["group"], []).append(row)
    firsts = []
    for rows in by_group.values():
        members = sorted(int(r["id"][4:]) for r in rows)
        first = members[0]
        firsts.append(first)
        for r in rows:
            assert r["representative"] == f"item{first}"
            assert r["similarity"] == pytest.approx(float(vectors[int(r["id"][4:])] @ vectors[first]), abs=1e-5)
    assert firsts == sorted(firsts)  # groups numbered in store order of their first items
    exact_rows = {r["id"]: r["exact"] for r in table if r["id"] in ("item5", "item17", "item40", "item2000")}
    assert exact_rows == {"item5": True, "item17": True, "item40": True, "item2000": True}
    summary = result.summary
    assert summary["removed"] == summary["items_in_groups"] - summary["groups"]
    assert summary["kept"] + summary["removed"] == summary["items"] == len(vectors)

    out, manifest = str(tmp_path / "dedup"), str(tmp_path / "kept.jsonl")
    write_outputs(result, out, manifest)
    assert pq.read_table(fs.join(out, "groups.parquet")).equals(result.groups)
    assert json.loads(fs.read_bytes(fs.join(out, "summary.json")))["kept"] == summary["kept"]
    kept = [item.id for item in iter_manifest(manifest)]  # a manifest pipelines.embed reads
    removed = {r["id"] for r in table if r["id"] != r["representative"]}
    assert kept == [f"item{i}" for i in range(len(vectors)) if f"item{i}" not in removed]


def test_the_cli_writes_the_outputs_and_refuses_bad_flags_in_one_line(planted, tmp_path, capsys):
    root, vectors, groups, _ = planted
    out = str(tmp_path / "d")
    assert main(["--embeddings", root, "--out", out, "--threshold", "0.95", "--kept-manifest",
                 str(tmp_path / "kept.jsonl")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(fs.read_bytes(fs.join(out, "summary.json")))
    assert summary["groups"] == len(expected_groups(groups, [(5, 17), (40, 2000)]))
    assert printed.startswith(f"{len(vectors)} items: {summary['groups']} groups of duplicates")
    for argv, message in [(["--embeddings", str(tmp_path / "nowhere"), "--out", out], "embedding folder not found"),
                          (["--embeddings", root, "--out", out, "--threshold", "1.5"], "--threshold is a cosine"),
                          (["--embeddings", root, "--out", out, "--runner=X"], "Beam options need --distributed")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("jobs.dedup: error: ") and message in err


def test_caption_embeddings_dedup_by_the_mean_of_each_items_captions(tmp_path):
    from koclip.store import Row, rows_to_table, write_shard

    v = random_unit(6, 3)
    near = (v[0] + 0.05 * v[1]) / np.linalg.norm(v[0] + 0.05 * v[1])
    rows = [Row("a", "a.png", "1" * 64, 8, 8, ["x", "y"], v[5], np.stack([v[0], v[2]])),
            Row("b", "b.png", "2" * 64, 8, 8, ["x", "y"], v[4], np.stack([near, v[2]])),
            Row("c", "c.png", "3" * 64, 8, 8, ["z"], v[5], v[3][None]),
            Row("d", "d.png", "4" * 64, 8, 8, [], v[5], np.zeros((0, DIM), np.float32))]
    write_shard(str(tmp_path / "shard-00000.parquet"), rows_to_table(rows, "m", {}, DIM))
    by_caption = find_duplicates(open_store(str(tmp_path)), 0.95, column="caption_embeddings")
    assert sorted(by_caption.groups.column("id").to_pylist()) == ["a", "b"]
    by_image = find_duplicates(open_store(str(tmp_path)), 0.95)  # a, c and d share an image vector
    assert sorted(by_image.groups.column("id").to_pylist()) == ["a", "c", "d"]


def test_distributed_search_on_beam_finds_the_same_groups(planted, tmp_path):
    root, vectors, groups, _ = planted
    out = str(tmp_path / "beam")
    assert main(["--embeddings", root, "--out", out, "--distributed"]) == 0
    local = find_duplicates(open_store(root), 0.95)
    assert pq.read_table(fs.join(out, "groups.parquet")).equals(local.groups)
    assert not fs.exists(fs.join(out, "_work"))
