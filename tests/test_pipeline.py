"""The whole pipeline on the demo config (tiny models, demo catalog, embedded Ray), end to end.

One slow test: every stage runs for real (vLLM item and user summaries, Ray Train + DeepSpeed
ZeRO-2 LoRA, Ray Data scoring), then a rerun skips every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm_msr.config import load_config
from mllm_msr.pipeline import format_run_summary, run_pipeline
from mllm_msr.runtime import RunDir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_end_to_end_then_skips(ray_local, tmp_path):
    cfg = load_config(
        ROOT / "configs" / "demo-cpu.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "ingest.demo_users=80",
            "ingest.demo_items=60",
            "item_summaries.sampling.max_new_tokens=8",
            "user_preferences.sampling.max_new_tokens=8",
            "train.max_steps=4",
            "train.checkpoint_every=4",
            "train.image_size=56",
            "evaluate.baselines=[popularity,zero_shot,random]",
        ],
    )
    summary = run_pipeline(cfg)
    stages = summary["stages"]
    assert list(stages) == [
        "ingest",
        "prepare",
        "item_summaries",
        "user_preferences",
        "train",
        "evaluate",
    ]
    assert not any(s["skipped"] for s in stages.values())
    run = RunDir(cfg.run_dir)
    on_disk = json.loads((Path(cfg.run_dir) / "run_summary.json").read_text())
    assert on_disk["stages"].keys() == stages.keys()

    # Counts add up: nothing lost between stages.
    items = run.read_table("items", ["item_id"])
    summaries = run.read_table("item_summaries", ["item_id"])
    # An item is summarized or quarantined (e.g. an empty output of the random model), once.
    quarantined = (
        run.read_table("quarantine/item_summaries", ["key"])["key"].to_pylist()
        if run.table_files("quarantine/item_summaries")
        else []
    )
    done = summaries["item_id"].to_pylist()
    assert len(done) == len(set(done)) and not set(done) & set(quarantined)
    assert sorted(done + quarantined) == sorted(items["item_id"].to_pylist())
    sequences = run.read_table("sequences", ["user_id", "split"])
    prefs = run.read_table("preferences", ["user_id", "is_final"])
    finals = [u for u, f in zip(prefs["user_id"].to_pylist(), prefs["is_final"].to_pylist()) if f]
    assert sorted(finals) == sorted(sequences["user_id"].to_pylist())

    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    n_test = sequences["split"].to_pylist().count("test")
    assert metrics["n_users"] == n_test and metrics["n_candidates"] == 21 * n_test
    assert set(metrics["methods"]) == {"fine_tuned", "zero_shot", "popularity", "random"}
    for method, m in metrics["methods"].items():
        assert m["n_users"] == n_test, method
        assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["hr@1"] <= m["hr@5"] <= m["hr@10"] <= 1.0
    # What a user reads (issue 16): intervals, provenance, report, portable adapter, telemetry.
    for method in metrics["methods"]:
        assert set(metrics["intervals"][method]) >= {"auc", "hr@1", "ndcg@10"}, method
    assert set(metrics["paired_diff"]) == {"zero_shot", "popularity", "random"}
    assert metrics["provenance"]["stage_fingerprints"].keys() >= {"ingest", "train"}
    assert on_disk["provenance"]["config"]["run_dir"] == cfg.run_dir
    report = (Path(cfg.run_dir) / "report.html").read_text()
    for section in ("metrics", "paired", "curves", "training", "scores", "stages", "provenance"):
        assert f'id="{section}"' in report, section
    assert report.count("data:image/png;base64,") == 4
    adapter = json.loads((Path(cfg.run_dir) / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == cfg.train.model  # a spec, not a path
    assert (
        "MLLM-MSR recommender adapter" in (Path(cfg.run_dir) / "adapter" / "README.md").read_text()
    )
    assert "| fine_tuned |" in (Path(cfg.run_dir) / "model_card.md").read_text()
    assert list((Path(cfg.run_dir) / "train" / "tensorboard").glob("events.out.tfevents.*"))

    again = run_pipeline(cfg)
    assert all(s["skipped"] for s in again["stages"].values())
    assert "evaluate" in format_run_summary(again)
