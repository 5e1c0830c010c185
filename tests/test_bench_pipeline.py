"""Smoke test of the pipeline benchmark: a --quick run measures every row (no speed assertions)."""
from __future__ import annotations

import json
from pathlib import Path


def test_quick_run_writes_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the workers run `python -m bench.pipeline`
    from bench import pipeline

    out = tmp_path / "pipeline.json"
    assert pipeline.main(["--quick", "--sizes", "40,80", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = [(r["run"], r["size"]) for r in data["rows"]]
    assert runs == [("bare encoder", 40), ("pipeline", 40), ("pipeline", 80), ("bare encoder", 40)]
    for row in data["rows"]:
        assert row["embedded"] == row["items"] == row["size"]
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["recompiles"] == 0
    for row in data["rows"][1:3]:
        assert 0 < row["startup_s"] < row["seconds"]
    bare_rates = [r["items"] / r["seconds"] for r in data["rows"] if r["run"] == "bare encoder"]
    assert min(bare_rates) <= data["bare_items_per_s_mean"] <= max(bare_rates)
    assert data["peak_rss_ratio"] > 0
    assert "pipeline throughput at 80 items" in capsys.readouterr().out
