"""Every shipped config runs: its pipeline on CPU with its models swapped for their tiny twins.

One test per file in ``configs/`` (``demo-cpu.yaml`` is the end-to-end test of
``tests/test_pipeline.py``). Each config's models go through the one override map
(:data:`mllm_msr.tiny.TWINS`); the data is the reduced demo catalog and the hardware settings
are CPU ones (``reduced_demo.on_cpu``), while the processor settings that decide whether a
sample fits (image sizes, ``train.max_length``, any-resolution grids of the twin), precision,
ZeRO stage and LoRA settings stay the config's. Each config with a train stage trains and
scores its twins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reduced_demo import on_cpu

from mllm_msr.config import load_config, models_in_use
from mllm_msr.pipeline import run_pipeline
from mllm_msr.runtime import RunDir
from mllm_msr.tiny import TINY_SPECS, TWINS, twin_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
COVERED_ELSEWHERE = {"demo-cpu.yaml": "tests/test_pipeline.py"}


def _config(name: str, run_dir: Path):
    cfg = load_config(ROOT / "configs" / name)
    return load_config(
        ROOT / "configs" / name, [*twin_overrides(cfg), *on_cpu(cfg), f"run_dir={run_dir}"]
    )


def test_every_shipped_config_has_a_test_and_every_model_a_twin(tmp_path):
    assert set(COVERED_ELSEWHERE) < set(CONFIGS)
    for name in CONFIGS:
        cfg = _config(name, tmp_path)
        assert all(model.startswith("tiny:") for _key, model, _fam in models_in_use(cfg)), (
            name
        )  # no real model is loaded
    assert set(TWINS.values()) <= {f"tiny:{n}" for n in TINY_SPECS}


@pytest.mark.slow
@pytest.mark.timeout(900)  # 417 s measured here at load average ~25
@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in COVERED_ELSEWHERE])
def test_shipped_config_runs_on_its_twins(ray_local, tmp_path, name):
    original = load_config(ROOT / "configs" / name)
    cfg = _config(name, tmp_path / "run")
    # processor settings stay the config's
    assert (cfg.train.max_length, cfg.train.image_size) == (
        original.train.max_length,
        original.train.image_size,
    )
    assert cfg.train.precision == original.train.precision
    assert cfg.train.zero.stage == original.train.zero.stage
    summary = run_pipeline(cfg)
    assert list(summary["stages"]) == list(cfg.stages)
    run = RunDir(cfg.run_dir)
    assert run.read_table("sequences", ["user_id"]).num_rows > 0
    if "train" in cfg.stages:
        train = run.stage_summary("train")
        assert train["steps"] == cfg.train.max_steps, train
        metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
        assert {"fine_tuned", "zero_shot"} <= set(metrics["methods"])
        for method in ("fine_tuned", "zero_shot"):
            assert 0.0 <= metrics["methods"][method]["auc"] <= 1.0, method
            assert metrics["methods"][method]["n_users"] >= 1, method
