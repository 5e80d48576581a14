"""Benchmark records (mllm_msr.bench_record): provenance fields and the load gate on ratios."""

from __future__ import annotations

import json

from mllm_msr.bench_record import BenchRecord, cores, load_average


def test_quiet_machine_keeps_ratios_and_writes_provenance(tmp_path):
    rec = BenchRecord("demo", load_before=0.5, started_at=1.0e9, cores=2, load_after=1.5)
    ratios = {"stage_vs_raw": 0.95}
    assert rec.gate_ratios(ratios) == ratios
    path = rec.write({"ratios": ratios, "x": 1}, tag="w", results_dir=tmp_path)
    assert path.parent == tmp_path / "demo" and path.name.endswith("-w.json")
    data = json.loads(path.read_text())
    prov = data["provenance"]
    assert prov["quiet"] is True
    assert (prov["load_before"], prov["load_after"], prov["cores"]) == (0.5, 1.5, 2)
    assert len(prov["git_commit"]) == 40
    assert prov["cpu_model"]
    assert prov["packages"]["pyarrow"]
    assert data["ratios"] == ratios and data["x"] == 1
    assert "ratios_refused" not in data
    assert not list(tmp_path.rglob("*.tmp"))


def test_busy_machine_refuses_ratios_and_says_why(tmp_path):
    rec = BenchRecord("demo", load_before=3.4, started_at=1.0e9, cores=2, load_after=1.0)
    assert rec.gate_ratios({"stage_vs_raw": 0.95}) is None
    data = json.loads(rec.write({"ratios": None}, results_dir=tmp_path).read_text())
    assert data["provenance"]["quiet"] is False
    assert "3.40" in data["ratios_refused"] and "2 cores" in data["ratios_refused"]
    assert "--allow-load" in data["ratios_refused"]


def test_load_after_is_noted_not_gating(tmp_path):
    # the benchmark's own two engine processes put the load after the run above 2 cores
    rec = BenchRecord("demo", load_before=0.6, started_at=1.0e9, cores=2, load_after=3.1)
    assert rec.gate_ratios({"stage_vs_raw": 0.95}) == {"stage_vs_raw": 0.95}
    data = json.loads(
        rec.write({"ratios": {"stage_vs_raw": 0.95}}, results_dir=tmp_path).read_text()
    )
    assert data["provenance"]["quiet"] is True
    assert any("3.10" in n and "own processes" in n for n in data["notes"])


def test_allow_load_reports_ratios_marked_not_quiet(tmp_path):
    rec = BenchRecord("demo", load_before=5.0, started_at=1.0e9, cores=2, load_after=1.0)
    ratios = {"stage_vs_raw": 0.5}
    assert rec.gate_ratios(ratios, allow_load=True) == ratios
    data = json.loads(rec.write({"ratios": ratios}, results_dir=tmp_path).read_text())
    assert data["provenance"]["quiet"] is False and data["ratios"] == ratios
    assert "exceeds the 2 cores" in data["notes"][0]


def test_machine_figures():
    assert cores() >= 1
    assert load_average() >= 0.0
