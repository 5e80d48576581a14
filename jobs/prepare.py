"""Prepare the protocol: k-core, chronological sequences, user split, seeded candidates.

Writes sequences/, candidates/, quarantine/prepare/ and the stage marker ``_stages/prepare.json``
(its summary) under the run directory; a completed stage is skipped, an interrupted one is
cleared and rerun.

Embedded local Ray (no address)::

    .venv/bin/python jobs/prepare.py --config configs/microlens-50k.yaml

On a cluster (the data root must be readable from the workers)::

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/microlens-50k.yaml \
        ingest.root=/mnt/data/microlens-50k run_dir=s3://bucket/runs/microlens-50k

Overrides are dotted ``key=value`` pairs, e.g. ``prepare.seed=7 ingest.num_shards=8``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr.config import PipelineConfig, load_config  # noqa: E402
from mllm_msr.runtime import RunDir, init_ray  # noqa: E402
from mllm_msr.stages.prepare import run_prepare  # noqa: E402


def main(cfg: PipelineConfig) -> dict:
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
    run = RunDir(cfg.run_dir)
    summary = run_prepare(cfg, run)
    print(f"run directory: {run.uri}")
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo-cpu.yaml", help="YAML config file")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prepare.seed=7")
    return p


if __name__ == "__main__":
    args = make_parser().parse_args()
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    main(load_config(args.config, overrides))
