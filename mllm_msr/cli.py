"""What every job entry point shares: the parser, the config, the cache dir and Ray.

Jobs under ``jobs/`` stay thin: a docstring with the commands that run them, ``main(cfg)`` that
calls one library function, and ``make_parser`` from here::

    args = make_parser(__doc__).parse_intermixed_args()
    main(config_from_args(args))
"""

from __future__ import annotations

import argparse
from typing import Any

from mllm_msr.config import PipelineConfig, load_config
from mllm_msr.runtime import RunDir, check_run_dir_shared, init_ray, use_cache_dir


def make_parser(doc: str | None, example: str = "train.lora.r=16") -> argparse.ArgumentParser:
    """``--config``, ``--address`` and dotted overrides (add job-specific flags to the result)."""
    p = argparse.ArgumentParser(
        description=(doc or "").strip().split("\n")[0],
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/demo-cpu.yaml", help="YAML config file")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    return p


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config file plus overrides; ``--address`` becomes ``ray.address``."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config, overrides)


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
