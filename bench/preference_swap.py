"""Does the fine-tuned recommender read the user's preference? A counterfactual on a finished run.

Scores a finished run's test candidates with its fine-tuned adapter three ways, on the same rows
as the evaluate stage:

* ``own``: each user's own final preference (what the evaluate stage does; must match its
  ``scores/fine_tuned.parquet``);
* ``swapped``: each user's preference replaced by another test user's (a seeded derangement), the
  candidates and labels unchanged;
* ``empty``: no preference text at all (the prompt's "(unknown)").

If AUC and HR@5 barely move when the preference is swapped, the model ranks candidates by the
item (its title) and not by the user. Writes a JSON next to the other results.

    .venv/bin/python bench/preference_swap.py [--run-dir runs/microlens-50k-smollm2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mllm_msr.config import load_config  # noqa: E402
from mllm_msr.metrics import evaluate_scores, paired_bootstrap_diff  # noqa: E402
from mllm_msr.recommender.samples import derangement  # noqa: E402
from mllm_msr.runtime import RunDir, use_cache_dir  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "microlens-50k-smollm2.yaml"))
    p.add_argument("--run-dir", default=None, help="default: the config's run_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "preference_swap.json"))
    args = p.parse_args(argv)

    from mllm_msr.recommender.samples import build_sft_samples
    from mllm_msr.recommender.score import YesNoScorer
    from mllm_msr.stages.evaluate import select_users

    cfg = load_config(args.config, [f"run_dir={args.run_dir}"] if args.run_dir else [])
    use_cache_dir(cfg.cache_dir)
    run = RunDir(cfg.run_dir)
    if not run.exists("adapter"):
        raise SystemExit(f"{cfg.run_dir}: no adapter; run the benchmark first")
    rows = select_users(run.read_table("candidates"), "test", cfg.evaluate.max_users, cfg.seed)
    samples, _, _ = build_sft_samples(
        rows,
        run.read_table("sequences"),
        run.read_table("items", ["item_id", "title", "images"]),
        None,
        run.read_table("preferences"),
        splits=("test",),
        stage="evaluate",
    )
    users = sorted(set(samples["user_id"].to_pylist()))
    pref_of = dict(zip(samples["user_id"].to_pylist(), samples["preference"].to_pylist()))
    other = dict(zip(users, (users[j] for j in derangement(len(users), args.seed))))
    variants = {
        "own": samples,
        "swapped": samples.set_column(
            samples.schema.get_field_index("preference"),
            "preference",
            pa.array([pref_of[other[u]] for u in samples["user_id"].to_pylist()], pa.string()),
        ),
        "empty": samples.set_column(
            samples.schema.get_field_index("preference"),
            "preference",
            pa.array([""] * samples.num_rows, pa.string()),
        ),
    }
    scorer = YesNoScorer(
        cfg.train.model,
        run.uri_of("adapter"),
        cfg.train,
        precision=cfg.evaluate.precision,
        share_prefix=cfg.evaluate.share_prefix,
    )
    tables, report = {}, {"run_dir": cfg.run_dir, "users": len(users), "variants": {}}
    for name, table in variants.items():
        t0 = time.perf_counter()
        scored = scorer(table)
        tables[name] = scored
        m = evaluate_scores(scored, ks=cfg.evaluate.ks)
        report["variants"][name] = {
            "auc": m["auc"],
            "hr@5": m["hr@5"],
            "ndcg@5": m["ndcg@5"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, report["variants"][name], flush=True)
    for name in ("swapped", "empty"):
        diff = paired_bootstrap_diff(tables["own"], tables[name], ks=cfg.evaluate.ks, seed=0)
        report[f"own_minus_{name}"] = {m: diff[m] for m in ("auc", "hr@5", "ndcg@5")}
    own = tables["own"]["score"].to_numpy()
    report["score_spearman_own_vs_swapped"] = float(
        np.corrcoef(
            np.argsort(np.argsort(own)),
            np.argsort(np.argsort(tables["swapped"]["score"].to_numpy())),
        )[0, 1]
    )
    if run.exists("scores", "fine_tuned.parquet"):
        import pyarrow.parquet as pq

        stage = pq.read_table(run.path("scores", "fine_tuned.parquet"), filesystem=run.fs)
        same = stage["item_id"].to_pylist() == tables["own"]["item_id"].to_pylist()
        report["own_max_abs_diff_vs_evaluate_stage"] = (
            float(np.max(np.abs(stage["score"].to_numpy() - own))) if same else None
        )
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
