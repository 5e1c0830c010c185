"""Smoke test of the listing benchmark: every size is planned in its own process and reported."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow  # a benchmark smoke run (about 40 s)
def test_listing_bench_reports_each_size(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the workers run `python -m bench.listing`
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench import listing

    out = tmp_path / "listing.json"
    assert listing.main(["--sizes", "300,2500", "--unit-size", "1000", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["items"], r["units"]) for r in rows] == [(300, 1), (2500, 3)]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] >= r["base_rss_mb"] > 0 for r in rows)
    assert "peak - base MB" in capsys.readouterr().out
