"""Smoke test of the encoder benchmark: a --quick run writes the expected rows (no speed assertions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.slow  # a benchmark smoke run (about 40 s)
def test_quick_run_writes_all_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
    from bench import encoders

    out = tmp_path / "results" / "x.json"
    encoders.main(["--quick", "--out", str(out)])

    data = json.loads(out.read_text())
    rows = {(r["tower"], r["framework"], r["dtype"]): r for r in data["rows"]}
    # Without native bf16 on the CPU (data["torch_bf16_probe"]), torch's bf16 rows are left out.
    torch_bf16 = data["torch_bf16_probe"]["usable"]
    assert set(rows) == {(tower, framework, dtype) for tower in ("image", "text", "cliptext")
                         for framework in ("ours (flax)", "transformers (torch)")
                         for dtype in ("float32", "bfloat16")
                         if torch_bf16 or (framework, dtype) != ("transformers (torch)", "bfloat16")}
    for (tower, framework, dtype), row in rows.items():
        assert row["items_per_s"] > 0 and row["ms_per_batch"] > 0 and row["gflop_per_item"] > 0
        assert row["pct_of_matmul_peak"] > 0
        assert (row["compile_s"] is not None) == framework.startswith("ours")
        paired = framework.startswith("ours") and (torch_bf16 or dtype == "float32")
        assert ("ratio_ours_over_torch" in row) == paired
    assert all(v > 0 for v in data["matmul_peak_gflops"]["by_dtype"].values())
    assert data["machine"]["cores_available"] >= 1 and data["machine"]["torch"]
    assert data["threads"]["torch_intra_op"] == data["machine"]["cores_available"]
    assert "ours/torch" in capsys.readouterr().out


@pytest.mark.slow  # a benchmark smoke run of one tower (about 15 s)
def test_each_matmul_gets_its_own_row_and_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench import encoders
    from koclip.modeling import onednn

    out = tmp_path / "x.json"
    encoders.main(["--quick", "--only", "text", "--dtypes", "float32", "--matmul", "xla,onednn:2", "--out", str(out)])

    data = json.loads(out.read_text())
    rows = {r["framework"]: r for r in data["rows"]}
    assert set(rows) == {"ours (flax, xla)", "ours (flax, onednn:2)", "transformers (torch)"}
    built = onednn.load()["available"]
    assert rows["ours (flax, xla)"]["matmul"] == "xla"
    assert rows["ours (flax, onednn:2)"]["matmul"] == ("onednn" if built else "xla")
    assert rows["transformers (torch)"]["matmul"] is None
    for name in ("ours (flax, xla)", "ours (flax, onednn:2)"):
        assert rows[name]["ratio_ours_over_torch"] == pytest.approx(
            rows[name]["items_per_s"] / rows["transformers (torch)"]["items_per_s"])
    assert data["matmul_paths"]["xla"]["matmul"] == "xla"
    assert "--matmul xla: our dense layers run xla" in capsys.readouterr().out
