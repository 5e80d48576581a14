"""Run the stages of a :class:`~mllm_msr.config.PipelineConfig` in order.

Each stage is a function ``run_<stage>(cfg, run) -> dict`` (its summary). A stage whose completion
marker exists in the run directory is skipped, so a rerun after a crash resumes at the first
unfinished stage. The pipeline writes ``run_summary.json`` (per stage: rows in / out /
quarantined, seconds, skipped) and, through the evaluate stage, ``metrics.json``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from mllm_msr.config import PipelineConfig, to_dict
from mllm_msr.runtime import RunDir

STAGES: dict[str, str] = {
    "ingest": "mllm_msr.stages.ingest:run_ingest",
    "prepare": "mllm_msr.stages.prepare:run_prepare",
    "item_summaries": "mllm_msr.stages.item_summaries:run_item_summaries",
    "user_preferences": "mllm_msr.stages.user_preferences:run_user_preferences",
    "train": "mllm_msr.stages.train:run_train",
    "evaluate": "mllm_msr.stages.evaluate:run_evaluate",
}

#: Stages whose outputs a given stage reads; rerunning a stage invalidates those after it.
ORDER = list(STAGES)


def stage_function(name: str) -> Callable[[PipelineConfig, RunDir], dict]:
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def _counts(summary: dict) -> dict:
    keys = ("rows_in", "rows_out", "quarantined")
    return {k: summary.get(k) for k in keys if k in summary}


def run_pipeline(cfg: PipelineConfig, force: list[str] | None = None, log=print) -> dict:
    """Run ``cfg.stages`` in pipeline order; returns the run summary (also written to disk).

    ``force`` names stages to rerun even when complete (later stages are rerun too).
    """
    run = RunDir(cfg.run_dir)
    run.write_json("config.json", to_dict(cfg))
    forced = set(force or [])
    if forced:
        first = min(ORDER.index(s) for s in forced)
        for stage in ORDER[first:]:
            run.clear_stage(stage)
    summary: dict = {"name": cfg.name, "run_dir": run.uri, "stages": {}}
    t_all = time.perf_counter()
    for stage in [s for s in ORDER if s in cfg.stages]:
        if run.stage_done(stage):
            done = run.stage_summary(stage) or {}
            log(f"[pipeline] {stage}: complete, skipped")
            summary["stages"][stage] = {
                "skipped": True,
                **_counts(done),
                "seconds": done.get("seconds"),
            }
            continue
        log(f"[pipeline] {stage}: running")
        t0 = time.perf_counter()
        result = stage_function(stage)(cfg, run) or {}
        seconds = round(time.perf_counter() - t0, 2)
        summary["stages"][stage] = {"skipped": False, **_counts(result), "seconds": seconds}
        log(f"[pipeline] {stage}: done in {seconds:.1f} s {_counts(result)}")
    summary["seconds"] = round(time.perf_counter() - t_all, 2)
    if run.exists("metrics.json"):
        summary["metrics"] = run.read_json("metrics.json")
    run.write_json("run_summary.json", summary)
    return summary


def format_run_summary(summary: dict) -> str:
    rows = ["stage              skipped  rows_in  rows_out  quarantined  seconds"]
    for stage, s in summary["stages"].items():
        rows.append(
            f"{stage:<18} {('yes' if s.get('skipped') else 'no'):<8} "
            f"{_fmt(s.get('rows_in')):>7}  {_fmt(s.get('rows_out')):>8}  "
            f"{_fmt(s.get('quarantined')):>11}  {_fmt(s.get('seconds')):>7}"
        )
    return "\n".join(rows)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)
