"""What every job entry point shares: the parser, the config, the cache dir and Ray.

Jobs under ``jobs/`` stay thin: a docstring with the commands that run them, ``main(cfg)`` that
calls one library function, and ``make_parser`` from here::

    args = make_parser(__doc__).parse_intermixed_args()
    main(config_from_args(args))

The same jobs as one console script (``pip install -e .`` puts it on PATH)::

    mllm-msr pipeline --config configs/demo-cpu.yaml
    mllm-msr item_summaries --config configs/demo-cpu.yaml --print-config
    python -m mllm_msr train --help

Every job takes ``--config``, ``--address``, ``--log-level`` (ours; engines and Ray stay at
WARNING unless DEBUG), ``--print-config`` (the resolved config as YAML, then exit), ``--force``
and ``--dry-run``. Job names are stage names; ``summarize_items``, ``summarize_users`` and
``train_recommender`` are kept as aliases.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from mllm_msr import console
from mllm_msr.config import PipelineConfig, load_config, to_dict
from mllm_msr.runtime import RunDir, check_run_dir_shared, init_ray, use_cache_dir

STAGE_JOBS = ("ingest", "prepare", "item_summaries", "user_preferences", "train", "evaluate")
"""One job per stage, named as the stage (``jobs/<stage>.py``, ``mllm-msr <stage>``)."""
ALIASES = {
    "summarize_items": "item_summaries",
    "summarize_users": "user_preferences",
    "train_recommender": "train",
}
"""Earlier job names, kept: they run the same code."""
EXAMPLES = {
    "ingest": "ingest.num_shards=8",
    "prepare": "prepare.seed=7",
    "item_summaries": "item_summaries.pool.concurrency=2",
    "user_preferences": "user_preferences.mode=direct",
    "train": "train.max_steps=100",
    "evaluate": "evaluate.max_users=100",
    "pipeline": "train.lora.r=16 stages=[ingest,prepare]",
}
JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"


def make_parser(doc: str | None, example: str = "train.lora.r=16") -> argparse.ArgumentParser:
    """``--config``, ``--address`` and dotted overrides (add job-specific flags to the result)."""
    p = argparse.ArgumentParser(
        description=(doc or "").strip().split("\n")[0],
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/demo-cpu.yaml", help="YAML config file")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=console.LEVELS,
        help="our log level (default INFO; engines and Ray log at WARNING, DEBUG shows everything)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    return p


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config file plus overrides; ``--address`` becomes ``ray.address``. Sets the log
    levels (``--log-level``) for this process and the Ray workers it starts."""
    console.configure(getattr(args, "log_level", None))
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config, overrides)


def format_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` prints)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def start(cfg: PipelineConfig, ray: bool = True) -> RunDir:
    """Export the model cache dir, connect to (or start) Ray, and open the run directory."""
    use_cache_dir(cfg.cache_dir)
    if ray:
        init_ray(
            cfg.ray.address,
            cfg.ray.num_cpus,
            cfg.ray.object_store_memory,
            hf_hub_offline=cfg.hf_hub_offline,
        )
    run = RunDir(cfg.run_dir)
    if ray:
        check_run_dir_shared(run, cfg.run_dir_shared)
    return run


def stage_parser(doc: str | None, example: str) -> argparse.ArgumentParser:
    """The parser of a one-stage job: ``--force`` (run it fresh) and ``--dry-run``."""
    p = make_parser(doc, example)
    p.add_argument("--force", action="store_true", help="run the stage fresh, even if up to date")
    p.add_argument(
        "--dry-run", action="store_true", help="print whether the stage would run and why"
    )
    return p


def run_stage_job(cfg: PipelineConfig, stage: str, force: bool = False, dry_run: bool = False):
    """Run one stage through the pipeline (fingerprints, lease, completion record); returns the
    stage's summary (its completion record's summary when it was up to date)."""
    import dataclasses

    from mllm_msr.pipeline import run_pipeline

    use_cache_dir(cfg.cache_dir)
    one = dataclasses.replace(cfg, stages=[stage])
    out = run_pipeline(one, force=[stage] if force else None, dry_run=dry_run)
    if dry_run:
        return out
    run = RunDir(cfg.run_dir)
    summary = dict(run.stage_summary(stage) or {})
    summary["skipped"] = out["stages"][stage]["skipped"]
    print_summary(summary, run)
    return summary


def print_summary(summary: dict[str, Any], run: RunDir) -> None:
    import json

    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    print(f"run directory: {run.uri}")


# --------------------------------------------------------------------------- entry points


def stage_main(stage: str, doc: str | None = None, argv: list[str] | None = None):
    """``jobs/<stage>.py`` and ``mllm-msr <stage>``: parse, then run the stage (or print its
    config)."""
    args = stage_parser(doc or job_doc(stage), EXAMPLES[stage]).parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(format_config(cfg), end="")
        return None
    return run_stage_job(cfg, stage, force=args.force, dry_run=args.dry_run)


def pipeline_parser(doc: str | None = None) -> argparse.ArgumentParser:
    p = make_parser(doc or job_doc("pipeline"), EXAMPLES["pipeline"])
    p.add_argument(
        "--force", nargs="*", default=None, help="stages to run fresh (the stages after them too)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and why; run nothing")
    return p


def run_pipeline_job(
    cfg: PipelineConfig, force: list[str] | None = None, dry_run: bool = False
) -> dict:
    """Run the pipeline and print its run summary and metrics (``[pipeline]`` lines)."""
    from mllm_msr.pipeline import format_run_summary, run_pipeline

    start(cfg, ray=False)  # the pipeline starts or joins Ray when a stage has to run
    summary = run_pipeline(cfg, force=force, dry_run=dry_run)
    if dry_run:
        return summary
    lines = ["", *format_run_summary(summary).splitlines()]
    if "metrics" in summary:
        from mllm_msr.report import format_metrics_table

        m = summary["metrics"]
        lines += ["", f"{m.get('split', 'test')} metrics (x100):"]
        table = format_metrics_table(m["methods"], ks=m.get("ks", (1, 3, 5, 10)), fmt="text")
        lines += table.splitlines()
        for method, sens in (m.get("user_sensitivity") or {}).get("methods", {}).items():
            d, lo, hi = (100 * v for v in sens["own_minus_swapped"]["auc"])
            lines.append(
                f"user sensitivity of {method}: AUC own - swapped preference = "
                f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}] (x100; near 0 when a model ignores its user)"
            )
    lines += ["", f"run directory: {summary['run_dir']}  ({summary['seconds']:.0f} s)"]
    for line in lines:
        print(f"[pipeline] {line}" if line else "")
    return summary


def pipeline_main(doc: str | None = None, argv: list[str] | None = None):
    """``jobs/pipeline.py`` and ``mllm-msr pipeline``."""
    args = pipeline_parser(doc).parse_intermixed_args(argv)
    if args.force:  # `--force train train.lr=1e-4`: the key=value words are overrides
        args.overrides += [f for f in args.force if "=" in f]
        args.force = [f for f in args.force if "=" not in f]
    cfg = config_from_args(args)
    if args.print_config:
        print(format_config(cfg), end="")
        return None
    return run_pipeline_job(cfg, force=args.force, dry_run=args.dry_run)


def job_doc(name: str) -> str:
    """The docstring of ``jobs/<name>.py`` (read, not run), or a short one without the file."""
    path = JOBS_DIR / f"{name}.py"
    if path.is_file():
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if doc:
            return doc
    if name == "pipeline":
        return "Run the whole MLLM-MSR pipeline from one config."
    return f"Run the {name} stage of the MLLM-MSR pipeline."


def resolve_job(name: str) -> str:
    """A job or alias name (``summarize_items``, ``item-summaries``) -> the stage (or pipeline)."""
    name = name.replace("-", "_")
    name = ALIASES.get(name, name)
    if name != "pipeline" and name not in STAGE_JOBS:
        known = ", ".join(["pipeline", *STAGE_JOBS])
        raise SystemExit(
            f"mllm-msr: unknown job {name!r}; one of {known} (aliases: {', '.join(ALIASES)})"
        )
    return name


def usage() -> str:
    lines = [
        "usage: mllm-msr <job> [--config FILE] [--log-level LEVEL] [--print-config] [--force ...]",
        "                [--dry-run] [key=value ...]",
        "",
        "MLLM-MSR as Ray jobs. Jobs (the same as jobs/<job>.py):",
        "  pipeline            every stage of the config, skipping those up to date",
    ]
    for stage in STAGE_JOBS:
        lines.append(f"  {stage:<19} one stage (e.g. {EXAMPLES[stage]})")
    lines += [
        "",
        "Aliases: " + ", ".join(f"{a} -> {s}" for a, s in ALIASES.items()),
        "",
        "Examples:",
        "  mllm-msr pipeline --config configs/demo-cpu.yaml",
        "  mllm-msr pipeline --config configs/demo-cpu.yaml --force train",
        "  mllm-msr evaluate --config configs/demo-cpu.yaml --print-config",
        "  mllm-msr train --help",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``mllm-msr`` console script: ``mllm-msr <stage|pipeline|alias> [args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    job, rest = resolve_job(argv[0]), argv[1:]
    if job == "pipeline":
        pipeline_main(argv=rest)
    else:
        stage_main(job, argv=rest)
    return 0
