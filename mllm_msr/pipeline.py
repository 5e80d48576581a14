"""Run the stages of a :class:`~mllm_msr.config.PipelineConfig` under the stage contract.

The pipeline owns skip / rerun (:mod:`mllm_msr.contract`): before anything runs it plans every
stage of ``cfg.stages`` — *skip* when the stage's completion record has the current fingerprint
and its recorded parts are intact, *run* otherwise, with the reasons (which config keys changed,
which input changed, which part is damaged). ``force`` names stages to run fresh (training starts
over, summaries are recomputed); the stages after them run too. ``dry_run`` prints the plan and
stops.

While it runs the pipeline holds the run directory's lease (:mod:`mllm_msr.lease`), starts Ray
when a stage needs to run, and writes each stage's completion record (fingerprint, config values,
input fingerprints, prompt versions, parts with size / SHA-256 / rows, summary). At the end it
writes ``config.json`` and ``run_summary.json`` (per stage: rows in / out / quarantined, seconds,
skipped, why it ran; the run's provenance, :mod:`mllm_msr.provenance`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mllm_msr.config import PipelineConfig, to_dict
from mllm_msr.contract import ORDER, STAGES, Fingerprint, downstream, explain, fingerprint
from mllm_msr.runtime import RunDir


def stage_function(name: str) -> Callable[..., dict]:
    module, func = STAGES[name].entry.split(":")
    return getattr(importlib.import_module(module), func)


def _counts(summary: dict) -> dict:
    keys = ("rows_in", "rows_out", "quarantined")
    return {k: summary.get(k) for k in keys if k in summary}


@dataclass
class Step:
    """One stage of the plan."""

    stage: str
    run: bool
    fresh: bool
    reasons: list[str]
    fingerprint: Fingerprint
    damaged: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        if not self.run:
            return f"{self.stage}: up to date, skip"
        what = "run fresh" if self.fresh else "run"
        return f"{self.stage}: {what} ({'; '.join(self.reasons)})"


def plan(cfg: PipelineConfig, run: RunDir, force: list[str] | None = None) -> list[Step]:
    """Decide, for every stage of ``cfg.stages`` in pipeline order, whether it runs and why."""
    forced: set[str] = set()
    for stage in force or []:
        if stage not in STAGES:
            raise ValueError(f"--force: unknown stage {stage!r}; known: {ORDER}")
        forced.update(downstream(stage))
    records = {stage: run.stage_record(stage) for stage in ORDER}  # read once
    # what every stage reads: the recorded fingerprint of its inputs
    fps = {stage: (rec or {}).get("fingerprint") for stage, rec in records.items()}
    steps = []
    for stage in [s for s in ORDER if s in cfg.stages]:
        fp = fingerprint(cfg, stage, fps)
        record = records[stage]
        reasons = explain(record, fp)
        damaged: list[tuple[str, str]] = []
        if not reasons and record is not None:
            damaged = run.verify_manifest(record.get("parts", {}))
            reasons = [f"output {p} {why}" for p, why in damaged[:5]]
            if len(damaged) > 5:
                reasons.append(f"... and {len(damaged) - 5} more damaged parts")
        fresh = stage in forced
        if fresh:
            reasons = ["forced", *reasons]
        steps.append(Step(stage, bool(reasons), fresh, reasons, fp, damaged))
        fps[stage] = fp.value  # what the stages after it will read once it has run
    return steps


def stale_outside(cfg: PipelineConfig, run: RunDir) -> dict[str, list[str]]:
    """Completed stages not in ``cfg.stages`` whose record no longer matches the config (or
    whose inputs no longer match): their outputs were not made by the current config."""
    fps: dict[str, str | None] = {}
    out = {}
    for stage in ORDER:
        record = run.stage_record(stage)
        fp = fingerprint(cfg, stage, fps)
        fps[stage] = fp.value if record is not None else None
        if stage in cfg.stages or record is None:
            continue
        reasons = explain(record, fp)
        if reasons:
            out[stage] = reasons
    return out


def run_stage(cfg: PipelineConfig, run: RunDir, step: Step, log=print) -> dict:
    """Run one planned stage and write its completion record; returns its summary."""
    spec = STAGES[step.stage]
    run.clear_stage(step.stage)  # incomplete until this run writes the record again
    if spec.incremental:
        for part, _ in step.damaged:  # corrupt or missing: redo its rows
            run.remove(part)
        for table in spec.outputs:
            run.drop_unreadable(table, log=log)
    func = stage_function(step.stage)
    kwargs = {}
    params = inspect.signature(func).parameters
    if spec.fresh_kwarg and step.fresh:
        kwargs["fresh"] = True
    if "log" in params:
        kwargs["log"] = log
    from mllm_msr.watchdog import no_progress_watchdog, ray_data_no_progress

    watched = [*spec.outputs, *spec.scratch]
    limit = cfg.no_progress_timeout_s

    setting = "no_progress_timeout_s"
    # What moves while a stage works: its output and checkpoint files, and their sizes.
    progress = functools.partial(run.usage, watched)
    with no_progress_watchdog(step.stage, limit, progress, setting=setting):
        with ray_data_no_progress(step.stage, limit, setting=setting):
            summary = func(cfg, run, **kwargs) or {}
    record = {
        **step.fingerprint.record(),
        "parts": run.manifest(list(spec.outputs)),
        "summary": summary,
    }
    run.write_stage_record(step.stage, record)
    return summary


def run_pipeline(
    cfg: PipelineConfig,
    force: list[str] | None = None,
    log=print,
    dry_run: bool = False,
) -> dict:
    """Run ``cfg.stages`` in pipeline order; returns the run summary (also written to disk)."""
    from mllm_msr.lease import RunLease

    run = RunDir(cfg.run_dir)
    steps = plan(cfg, run, force)
    stale = stale_outside(cfg, run)
    for step in steps:
        log(f"[pipeline] plan: {step.describe()}")
    for stage, reasons in stale.items():
        log(
            f"[pipeline] warning: {stage} is not in stages and no longer matches the config "
            f"({'; '.join(reasons[:3])}): its outputs are stale"
        )
    summary: dict = {
        "name": cfg.name,
        "run_dir": run.uri,
        "plan": {s.stage: s.describe() for s in steps},
        "stages": {},
    }
    if dry_run:
        return summary
    running = [s.stage for s in steps if s.run]
    if cfg.check_models and running:  # before Ray starts and before any stage deletes anything
        from mllm_msr.config import validate_models

        validate_models(dataclasses.replace(cfg, stages=running))
    t_all = time.perf_counter()
    with RunLease(run, log=log) as lease:
        if running:
            from mllm_msr.runtime import check_run_dir_shared, init_ray

            init_ray(
                cfg.ray.address,
                cfg.ray.num_cpus,
                cfg.ray.object_store_memory,
                hf_hub_offline=cfg.hf_hub_offline,
            )
            check_run_dir_shared(run, cfg.run_dir_shared)
        for step in steps:
            lease.check()
            if not step.run:
                done = run.stage_summary(step.stage) or {}
                log(f"[pipeline] {step.stage}: up to date, skipped")
                summary["stages"][step.stage] = {
                    "skipped": True,
                    **_counts(done),
                    "seconds": done.get("seconds"),
                }
                continue
            log(f"[pipeline] {step.stage}: running ({'; '.join(step.reasons)})")
            t0 = time.perf_counter()
            result = run_stage(cfg, run, step, log=log)
            seconds = round(time.perf_counter() - t0, 2)
            summary["stages"][step.stage] = {
                "skipped": False,
                "reasons": step.reasons,
                **_counts(result),
                "seconds": seconds,
            }
            log(f"[pipeline] {step.stage}: done in {seconds:.1f} s {_counts(result)}")
        summary["seconds"] = round(time.perf_counter() - t_all, 2)
        stale = stale_outside(cfg, run)
        if stale:
            summary["stale_stages"] = stale
        run.write_json("config.json", to_dict(cfg))
        if run.exists("metrics.json"):
            summary["metrics"] = run.read_json("metrics.json")
        from mllm_msr.provenance import collect

        summary["provenance"] = collect(cfg, run)
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
