"""Run the whole MLLM-MSR pipeline from one config.

ingest -> prepare -> item summaries -> user preferences -> train -> evaluate. Each stage runs
when its completion record does not match the current config and inputs (the console says which
keys changed), or when its recorded parts are damaged; up-to-date stages are skipped. Writes
``run_summary.json`` and ``metrics.json`` in the run directory and prints a table.

Embedded local Ray (no address)::

    .venv/bin/python jobs/pipeline.py --config configs/demo-cpu.yaml

On a cluster (``RAY_ADDRESS`` or ``--address``)::

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo-cpu.yaml \\
        run_dir=s3://bucket/runs/demo

The plan without running anything, then a fresh rerun of training and evaluation::

    .venv/bin/python jobs/pipeline.py --config configs/demo-cpu.yaml --dry-run train.epochs=2
    .venv/bin/python jobs/pipeline.py --config configs/demo-cpu.yaml --force train

Overrides are dotted ``key=value`` pairs: ``train.lora.r=16 stages=[ingest,prepare]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402
from mllm_msr.config import PipelineConfig  # noqa: E402


def main(cfg: PipelineConfig, force: list[str] | None = None, dry_run: bool = False) -> dict:
    return cli.run_pipeline_job(cfg, force=force, dry_run=dry_run)


def make_parser() -> argparse.ArgumentParser:
    return cli.pipeline_parser(__doc__)


if __name__ == "__main__":
    cli.pipeline_main(__doc__)
