"""Smoke test of the pipeline benchmark: a --quick run measures every row (no speed assertions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow  # about 2 minutes: a benchmark smoke run, not behaviour
def test_quick_run_writes_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the workers run `python -m bench.pipeline`
    from bench import pipeline

    out = tmp_path / "pipeline.json"
    assert pipeline.main(["--quick", "--sizes", "40,80", "--repeat", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = [(r["run"], r["size"]) for r in data["rows"]]
    bare = ("bare encoder", 40)
    assert runs == [bare, ("pipeline", 40), bare, ("pipeline", 80), bare, ("pipeline", 80), bare]
    for row in data["rows"]:
        assert row["embedded"] == row["items"] == row["size"]
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["recompiles"] == 0
    rates = [r["items"] / r["seconds"] for r in data["rows"]]
    for i, row in enumerate(data["rows"]):
        if row["run"] == "pipeline":  # compared with the mean of the bare runs just before and after it
            assert 0 < row["startup_s"] < row["seconds"]
            assert row["bare_items_per_s"] == (rates[i - 1] + rates[i + 1]) / 2
    summary = data["largest_pct_of_bare"]
    assert summary["lowest"] <= summary["median"] <= summary["highest"]
    assert sorted([summary["lowest"], summary["highest"]]) == sorted(r["pct_of_bare"] for r in data["rows"][3::2])
    assert data["peak_rss_ratio"] > 0
    assert "pipeline throughput at 80 items, 2 runs: median" in capsys.readouterr().out
