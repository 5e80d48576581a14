"""The whole pipeline on the demo config (tiny models, demo catalog, embedded Ray), end to end.

One slow test: every stage runs for real (vLLM item and user summaries, Ray Train + DeepSpeed
ZeRO-2 LoRA, Ray Data scoring), its losses and metrics match golden values recorded here (with
tolerances for other CPUs, explained at ``GOLDEN``), then a rerun skips every stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from reduced_demo import REDUCED_DEMO, check_counts_add_up

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
            *REDUCED_DEMO,
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

    sequences = check_counts_add_up(run)  # nothing lost between stages

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
    sections = ("metrics", "paired", "curves", "training", "scores", "sensitivity", "stages")
    for section in (*sections, "provenance"):
        assert f'id="{section}"' in report, section
    assert report.count("data:image/png;base64,") == 5  # with user sensitivity
    adapter = json.loads((Path(cfg.run_dir) / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == cfg.train.model  # a spec, not a path
    assert (
        "MLLM-MSR recommender adapter" in (Path(cfg.run_dir) / "adapter" / "README.md").read_text()
    )
    assert "| fine_tuned |" in (Path(cfg.run_dir) / "model_card.md").read_text()
    assert list((Path(cfg.run_dir) / "train" / "tensorboard").glob("events.out.tfevents.*"))

    observed = _observed(run.stage_summary("train"), metrics, Path(cfg.run_dir))
    if os.environ.get("MLLM_MSR_GOLDEN_OUT"):  # re-record: write what this run saw
        Path(os.environ["MLLM_MSR_GOLDEN_OUT"]).write_text(json.dumps(observed, indent=1))
    _check_golden(observed)

    again = run_pipeline(cfg)
    assert all(s["skipped"] for s in again["stages"].values())
    assert "evaluate" in format_run_summary(again)


# --------------------------------------------------------------------------- golden values


def _min_gap(user_ids: list, labels: list, scores: list) -> dict:
    """Smallest |positive - negative| score difference, within a user and over all rows."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0
    pooled = np.abs(s[y][:, None] - s[~y][None, :]).min()
    per_user = np.inf
    u = np.asarray(user_ids)
    for user in np.unique(u):
        m = u == user
        pos, neg = s[m & y], s[m & ~y]
        if len(pos) and len(neg):
            per_user = min(per_user, np.abs(pos[:, None] - neg[None, :]).min())
    return {"pooled": float(pooled), "per_user": float(per_user), "scale": float(np.ptp(s))}


def _observed(train: dict, metrics: dict, run_dir: Path) -> dict:
    out = {
        "losses": [loss for _, loss in train["losses"]],
        "val_loss": train.get("val_loss"),
        "metrics": {m: dict(v) for m, v in metrics["methods"].items()},
        "gaps": {},
    }
    for method in ("fine_tuned", "zero_shot"):
        t = pq.read_table(run_dir / "scores" / f"{method}.parquet").to_pydict()
        out["gaps"][method] = _min_gap(t["user_id"], t["label"], t["score"])
    return out


# Recorded on this project's CI-like CPU machine (2 cores, x86_64), fp32 demo with the overrides
# of test_demo_pipeline_end_to_end_then_skips; re-record with MLLM_MSR_GOLDEN_OUT=<file> after a
# deliberate behaviour change (the failure message also prints what the run saw).
GOLDEN: dict = {
    "losses": [6.302125, 5.709253, 5.346356, 4.771348],
    # the 1:1 validation set (one positive + one seeded negative per val user) since issue 18;
    # 4.280278 on the first rows of the 1:20 set before (losses and metrics unchanged)
    "val_loss": 4.618017,
    "metrics": {
        "fine_tuned": {
            "auc": 0.54921875,
            "uauc": 0.51875,
            "hr@1": 0.0,
            "hr@3": 0.125,
            "hr@5": 0.375,
            "hr@10": 0.5,
            "mrr@1": 0.0,
            "mrr@3": 0.0625,
            "mrr@5": 0.125,
            "mrr@10": 0.14583333333333331,
            "ndcg@1": 0.0,
            "ndcg@3": 0.07886621919643219,
            "ndcg@5": 0.18653535871478044,
            "ndcg@10": 0.23106125710328324,
            "n_rows": 168,
            "n_users": 8,
        },
        "zero_shot": {
            "auc": 0.4171875,
            "uauc": 0.39375000000000004,
            "hr@1": 0.0,
            "hr@3": 0.125,
            "hr@5": 0.25,
            "hr@10": 0.25,
            "mrr@1": 0.0,
            "mrr@3": 0.0625,
            "mrr@5": 0.09375,
            "mrr@10": 0.09375,
            "ndcg@1": 0.0,
            "ndcg@3": 0.07886621919643219,
            "ndcg@5": 0.13270078895560633,
            "ndcg@10": 0.13270078895560633,
            "n_rows": 168,
            "n_users": 8,
        },
        "popularity": {
            "auc": 0.57265625,
            "uauc": 0.565625,
            "hr@1": 0.0,
            "hr@3": 0.125,
            "hr@5": 0.25,
            "hr@10": 0.375,
            "mrr@1": 0.0,
            "mrr@3": 0.041666666666666664,
            "mrr@5": 0.07291666666666666,
            "mrr@10": 0.08854166666666666,
            "ndcg@1": 0.0,
            "ndcg@3": 0.0625,
            "ndcg@5": 0.11633456975917414,
            "ndcg@10": 0.15576767935739022,
            "n_rows": 168,
            "n_users": 8,
        },
        "random": {
            "auc": 0.53671875,
            "uauc": 0.53125,
            "hr@1": 0.0,
            "hr@3": 0.125,
            "hr@5": 0.125,
            "hr@10": 0.625,
            "mrr@1": 0.0,
            "mrr@3": 0.041666666666666664,
            "mrr@5": 0.041666666666666664,
            "mrr@10": 0.10674603174603174,
            "ndcg@1": 0.0,
            "ndcg@3": 0.0625,
            "ndcg@5": 0.0625,
            "ndcg@10": 0.22245441780290306,
            "n_rows": 168,
            "n_users": 8,
        },
    },
}
"""Losses of the 4 optimizer steps, the validation loss, and metrics.json (8 test users x 21
candidates)."""

LOSS_REL = (1e-3, 1e-3, 1e-2, 1e-2)
VAL_LOSS_REL = 1e-2
"""Loss tolerances. Between x86 CPUs fp32 kernels differ (AVX2 vs AVX-512 blockings, oneDNN),
about 1e-6 relative per forward pass. Step 1's loss is the base model's (LoRA B starts at 0),
step 2's follows one Adam step: 1e-3 relative is ~1000x that noise and far below any real change
(a template, sampling or collator change moves these losses by > 1e-2). Adam's first updates are
~lr * sign(grad), so gradients near 0 may flip an update on another CPU; steps 3-4 and the
validation loss (after 4 steps at lr 1e-2) get 1e-2. Upstream, the item and user summaries are
greedy fp32 vLLM outputs: in fp32 they did not change with batch composition (another kernel
blocking; see mllm_msr/stages/user_preferences.py), so another CPU is expected to give the same
texts, hence the same training samples."""

EXACT = 1e-9
"""``popularity`` and ``random`` use no floating-point model: their metrics are exact."""
ZERO_SHOT_ABS = EXACT
"""``zero_shot`` scores come from fp32 forward passes of the base model only (noise ~1e-7 in a
score). Their smallest positive-negative gap was 2.0e-3 within a user and 3.8e-4 over all rows
(``_min_gap`` on the recorded run): no pair is near a tie, so every ranking metric is pinned."""
FINE_TUNED_ABS = {"auc": 0.02, "uauc": 0.02, "hr": 0.125 + EXACT, "mrr": 0.0625 + EXACT}
"""``fine_tuned`` scores follow 4 Adam steps (see LOSS_REL) and its closest positive-negative
pair within a user is 2.1e-4 apart: one near-tie may flip on another CPU. One flip moves the
positive of one of the 8 users by one rank: hr@k by at most 1/8, mrr@k by at most 1/8 * (1 - 1/2)
and ndcg@k by at most 1/8 * (1 - 1/log2(3)) < 1/16; AUC and uAUC by < 0.01. AUC / uAUC get abs
0.02 (~25 pooled pair flips, 3 user-level ones)."""


def _tolerance(method: str, key: str) -> float:
    if key.startswith("n_") or method in ("popularity", "random"):
        return EXACT
    if method == "zero_shot":
        return ZERO_SHOT_ABS
    return FINE_TUNED_ABS.get(key, FINE_TUNED_ABS.get(key.split("@")[0], FINE_TUNED_ABS["mrr"]))


def _golden_problems(observed: dict, golden: dict = GOLDEN) -> list[str]:
    problems = []
    losses = observed["losses"]
    if len(losses) != len(golden["losses"]):
        problems.append(f"{len(losses)} losses, golden {len(golden['losses'])}")
    for i, (got, want, rel) in enumerate(zip(losses, golden["losses"], LOSS_REL), 1):
        if abs(got - want) > rel * abs(want):
            problems.append(f"loss of step {i}: {got} vs golden {want} (rel {rel})")
    got, want = observed["val_loss"], golden["val_loss"]
    if got is None or abs(got - want) > VAL_LOSS_REL * abs(want):
        problems.append(f"val_loss: {got} vs golden {want} (rel {VAL_LOSS_REL})")
    if set(observed["metrics"]) != set(golden["metrics"]):
        problems.append(f"methods {sorted(observed['metrics'])} vs {sorted(golden['metrics'])}")
    for method, want_metrics in golden["metrics"].items():
        got_metrics = observed["metrics"].get(method, {})
        for key, want in want_metrics.items():
            got, tol = got_metrics.get(key), _tolerance(method, key)
            if got is None or abs(got - want) > tol:
                problems.append(f"{method} {key}: {got} vs golden {want} (abs {tol})")
    return problems


def _check_golden(observed: dict) -> None:
    problems = _golden_problems(observed)
    assert not problems, (
        "the fp32 demo changed behaviour:\n  "
        + "\n  ".join(problems)
        + f"\nthis run saw {json.dumps(observed)}\n(a deliberate change: update GOLDEN)"
    )


def test_golden_check_tolerates_cpu_noise_and_catches_changes():
    """The tolerances above, on the recorded values (no pipeline run)."""
    import copy

    def observed(changes: dict | None = None) -> dict:
        """The golden values as a run's observations, with ``{"a/b/0": fn}`` applied."""
        o = copy.deepcopy({**GOLDEN, "gaps": {}})
        for path, fn in (changes or {}).items():
            *keys, last = path.split("/")
            target = o
            for k in keys:
                target = target[int(k)] if isinstance(target, list) else target[k]
            index = int(last) if isinstance(target, list) else last
            target[index] = fn(target[index])
        return o

    def near(x):
        return x * (1 + 1e-5)

    assert _golden_problems(observed()) == []
    assert _golden_problems(observed({"losses/0": near, "losses/3": near, "val_loss": near})) == []
    for fine in (
        {"metrics/fine_tuned/hr@5": lambda x: x - 0.125},
        {"metrics/fine_tuned/mrr@10": lambda x: x + 0.06},
        {"metrics/fine_tuned/auc": lambda x: x + 0.015},
        {"metrics/zero_shot/auc": lambda x: x + 1e-12},
    ):
        assert _golden_problems(observed(fine)) == [], fine
    for change in (
        {"losses/0": lambda x: x * 1.002},
        {"losses/3": lambda x: x * 1.02},
        {"val_loss": lambda x: x * 0.98},
        {"metrics/fine_tuned/hr@5": lambda x: x + 0.25},
        {"metrics/fine_tuned/auc": lambda x: x + 0.03},
        {"metrics/zero_shot/mrr@10": lambda x: x + 1e-6},
        {"metrics/popularity/auc": lambda x: x - 1e-6},
        {"metrics/random/n_users": lambda x: x + 1},
    ):
        assert len(_golden_problems(observed(change))) == 1, change
    assert _golden_problems({**observed(), "losses": GOLDEN["losses"][:3]})
