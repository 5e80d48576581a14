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

from mllm_msr import cli  # noqa: E402
from mllm_msr.config import PipelineConfig  # noqa: E402
from mllm_msr.stages.prepare import run_prepare  # noqa: E402


def main(cfg: PipelineConfig) -> dict:
    run = cli.start(cfg)
    summary = run_prepare(cfg, run)
    cli.print_summary(summary, run)
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, "prepare.seed=7")
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    main(cli.config_from_args(args))
