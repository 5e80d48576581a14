"""Evaluate stage: score the test (or validation) candidates, compute the paper's metrics.

Methods, side by side in one harness and on the same candidate rows:

- ``fine_tuned``: the recommender with the trained LoRA adapter (``<run_dir>/adapter/``);
- ``zero_shot``: the same base model without the adapter (the paper's "no fine-tuning" row);
- ``popularity``: training interaction counts; ``sasrec``: SASRec trained on the training users;
- ``random``: seeded random scores (a sanity floor).

Writes ``scores/<method>.parquet`` and ``metrics.json`` (``{"split", "ks", "methods": {method:
metrics}}``; each method's metrics include ``n_users`` and ``n_rows``; ``intervals`` and
``paired_diff`` hold seeded bootstrap intervals, ``provenance`` what made the run), then
``report.html`` (:func:`mllm_msr.report.write_report`) and, with a fine-tuned adapter,
``model_card.md`` (the adapter's card with the metrics).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_msr.config import KNOWN_BASELINES, PipelineConfig
from mllm_msr.metrics import evaluate_scores
from mllm_msr.runtime import RunDir, node_cache_dir


def select_users(candidates: pa.Table, split: str, max_users: int, seed: int) -> pa.Table:
    """The candidates of ``split``; with ``max_users > 0`` a seeded sample of that many users."""
    rows = candidates.filter(pc.equal(candidates["split"], split))
    if rows.num_rows == 0:
        raise ValueError(f"no candidates for split {split!r}")
    if max_users > 0:
        users = sorted(set(rows["user_id"].to_pylist()))
        if max_users < len(users):
            rng = np.random.default_rng(seed)
            keep = set(rng.choice(users, size=max_users, replace=False).tolist())
            rows = rows.filter(pc.is_in(rows["user_id"], pa.array(sorted(keep))))
    return rows


def _read_optional(run: RunDir, table: str, columns: list[str] | None = None) -> pa.Table | None:
    return run.read_table(table, columns) if run.table_files(table) else None


def run_evaluate(cfg: PipelineConfig, run: RunDir, log=print) -> dict:
    from mllm_msr.recommender.samples import build_sft_samples
    from mllm_msr.recommender.score import score_samples

    ev = cfg.evaluate
    cache_dir = node_cache_dir(cfg.cache_dir)  # where the scoring actors resolve the base model
    unknown = [b for b in ev.baselines if b not in KNOWN_BASELINES]
    if unknown:
        raise ValueError(f"evaluate.baselines: unknown {unknown}; known {list(KNOWN_BASELINES)}")
    t0 = time.perf_counter()
    candidates = run.read_table("candidates")
    sequences = run.read_table("sequences")
    rows = select_users(candidates, ev.split, ev.max_users, cfg.seed)
    methods: dict[str, pa.Table] = {}
    timings: dict[str, dict] = {}
    sensitivity: dict[str, dict] = {}

    if "popularity" in ev.baselines:
        from mllm_msr.baselines.popularity import popularity_scores

        methods["popularity"] = popularity_scores(sequences, rows, ev.split)
    if "random" in ev.baselines:
        from mllm_msr.baselines.common import random_scores

        methods["random"] = random_scores(sequences, rows, ev.split, seed=cfg.seed)
    if "sasrec" in ev.baselines:
        from mllm_msr.baselines.sasrec import SASRecConfig, sasrec_scores

        methods["sasrec"] = sasrec_scores(sequences, rows, ev.split, SASRecConfig(seed=cfg.seed))

    model_methods = []
    # The run's adapter, whatever ``stages`` says: re-evaluating a finished run scores it too.
    if run.exists("adapter", "adapter_config.json"):
        model_methods.append(("fine_tuned", run.uri_of("adapter")))
    else:
        log(f"[evaluate] no adapter in {run.uri_of('adapter')}: no fine_tuned row (run train)")
    if "zero_shot" in ev.baselines:
        model_methods.append(("zero_shot", None))
    quarantined = 0
    if model_methods:
        items = run.read_table("items", ["item_id", "title", "images"])
        samples, quarantine, stats = build_sft_samples(
            rows,
            sequences,
            items,
            _read_optional(run, "item_summaries", ["item_id", "summary"]),
            _read_optional(run, "preferences"),
            splits=(ev.split,),
            stage="evaluate",
        )
        quarantined = quarantine.num_rows
        run.remove("quarantine/evaluate")
        if quarantine.num_rows:
            run.write_table("quarantine/evaluate", quarantine)
        n_users = len(set(samples["user_id"].to_pylist()))
        swapped = None
        if ev.user_sensitivity and n_users >= 2:
            from mllm_msr.recommender.samples import swap_preferences

            swapped = swap_preferences(samples, cfg.seed)
        for name, adapter in model_methods:
            scores, timing = score_samples(
                samples, cfg.train.model, adapter, cfg.train, ev, name, cache_dir
            )
            methods[name] = scores
            timings[name] = timing
            if swapped is not None:
                other, timing = score_samples(
                    swapped, cfg.train.model, adapter, cfg.train, ev, f"{name}@swapped", cache_dir
                )
                timings[f"{name}@swapped"] = timing
                sensitivity[name] = user_sensitivity(scores, other, ev.ks, cfg.seed)
                log(
                    f"[evaluate] user sensitivity of {name}: AUC own - swapped = "
                    "{:+.4f} [{:+.4f}, {:+.4f}]".format(
                        *sensitivity[name]["own_minus_swapped"]["auc"]
                    )
                )

    results = {}
    for name, table in methods.items():
        run.write_table("scores", table, name=name)
        results[name] = evaluate_scores(table, ks=ev.ks)
    for path in run.table_files("scores"):  # methods of an earlier run not scored this time
        if path.rsplit("/", 1)[-1][: -len(".parquet")] not in methods:
            run.fs.delete_file(path)
    order = ["fine_tuned", "zero_shot", "sasrec", "popularity", "random"]
    results = {m: results[m] for m in order if m in results}
    metrics = {
        "split": ev.split,
        "ks": list(ev.ks),
        "n_users": len(set(rows["user_id"].to_pylist())),
        "n_candidates": rows.num_rows,
        "methods": results,
        "timings": timings,
    }
    metrics.update(_intervals(cfg, {m: methods[m] for m in results}))
    if sensitivity:  # the fine-tuned model's first (what the report shows), every method's too
        first = next(m for m in ("fine_tuned", "zero_shot") if m in sensitivity)
        metrics["user_sensitivity"] = {
            "method": first,
            **sensitivity[first],
            "methods": sensitivity,
        }
    from mllm_msr.provenance import collect

    metrics["provenance"] = collect(cfg, run)
    run.write_json("metrics.json", metrics)
    summary = {
        "rows_in": rows.num_rows,
        # Every candidate row ends scored (by every method) or quarantined.
        "rows_out": rows.num_rows - quarantined,
        "scores_written": sum(t.num_rows for t in methods.values()),
        "quarantined": quarantined,
        "methods": list(results),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_report(cfg, run, metrics, summary, log)
    return summary


SENSITIVITY_METRICS = ("auc", "uauc", "hr@5", "ndcg@5", "mrr@5")


def user_sensitivity(own: pa.Table, swapped: pa.Table, ks, seed: int) -> dict:
    """Metrics with the users' own preferences and with swapped ones, and own - swapped with
    a paired bootstrap interval (the same users resampled for both)."""
    from mllm_msr.metrics import paired_bootstrap_diff

    ks = list(ks)
    a, b = evaluate_scores(own, ks=ks), evaluate_scores(swapped, ks=ks)
    names = [m for m in SENSITIVITY_METRICS if m in a]
    diff = paired_bootstrap_diff(own, swapped, ks=ks, n_boot=BOOTSTRAP_RESAMPLES, seed=seed)
    return {
        "own": {m: a[m] for m in names},
        "swapped": {m: b[m] for m in names},
        "own_minus_swapped": {m: list(diff[m]) for m in names},
    }


BOOTSTRAP_RESAMPLES = 1000
"""User resamples of the bootstrap intervals in ``metrics.json`` (seeded with ``cfg.seed``)."""


def _intervals(cfg: PipelineConfig, tables: dict[str, pa.Table]) -> dict:
    """``intervals`` (per method, per metric: value, lo, hi), ``paired_diff`` (fine_tuned minus
    each other method) and the bootstrap's settings, for ``metrics.json``."""
    from mllm_msr.metrics import bootstrap_methods

    alpha = 0.05
    intervals, paired = bootstrap_methods(
        tables,
        ks=cfg.evaluate.ks,
        reference="fine_tuned",
        n_boot=BOOTSTRAP_RESAMPLES,
        alpha=alpha,
        seed=cfg.seed,
    )
    return {
        "intervals": intervals,
        "paired_diff": paired,
        "bootstrap": {
            "n_boot": BOOTSTRAP_RESAMPLES,
            "alpha": alpha,
            "seed": cfg.seed,
            "unit": "user",
            "paired_reference": "fine_tuned" if paired else None,
        },
    }


def _write_report(cfg: PipelineConfig, run: RunDir, metrics: dict, summary: dict, log) -> None:
    """``report.html`` and, with a fine-tuned adapter, ``model_card.md`` (the adapter's card with
    these metrics; the adapter folder itself belongs to the train stage and is left as it is)."""
    from mllm_msr.adapter_card import model_card
    from mllm_msr.report import write_report

    try:
        uri = write_report(run, metrics, title=cfg.name, evaluate_summary=summary)
        log(f"[evaluate] report: {uri}")
    except Exception as exc:  # the metrics are written; a figure must not fail the stage
        log(f"[evaluate] warning: report.html not written: {type(exc).__name__}: {exc}")
    if "fine_tuned" in metrics["methods"]:
        card = model_card(cfg, run.stage_summary("train"), metrics)
        run.write_bytes_at(run.path("model_card.md"), card.encode())
