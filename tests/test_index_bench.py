"""Smoke runs of bench/index.py --data hard and bench/dedup.py at small sizes (slow: real builds)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

pytestmark = pytest.mark.slow


def test_bench_index_hard_reports_every_candidate_and_what_auto_published(tmp_path):
    from bench.index import main

    out = tmp_path / "index.json"
    data = main(["--data", "hard", "--n", "60000", "--dim", "32", "--queries", "300", "--held-out", "300",
                 "--latency-queries", "20", "--out", str(out)])
    assert json.loads(out.read_text())["verdict"] == data["verdict"]
    kinds = [r["kind"] for r in data["rows"]]
    assert set(kinds) >= {"flat", "hnsw", "ivfpq", "ivfsq8", "ivfflat", "auto"}
    auto = next(r for r in data["rows"] if r["kind"] == "auto")
    tried = data["verdict"]["auto_tried"]
    assert tried[-1] == auto["published"] and tried == [k for k in ["hnsw", "ivfpq", "ivfsq8", "ivfflat", "flat"]
                                                         if k in tried]
    assert auto["target_reached"]  # exact search fits: the target is always kept


def test_bench_dedup_finds_the_planted_pairs(tmp_path):
    from bench.dedup import main

    data = main(["--n", "20000", "--dim", "64", "--exact-max-rows", "1000", "--out", str(tmp_path / "d.json")])
    row = data["rows"][0]
    assert row["method"].startswith("ivf") and row["pair_recall"] >= 0.99 and row["pair_precision"] == 1.0
    assert row["near_misses_grouped"] == 0
