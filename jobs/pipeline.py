"""Run the whole MLLM-MSR pipeline from one config.

ingest -> prepare -> item summaries -> user preferences -> train -> evaluate; finished stages are
skipped. Writes ``run_summary.json`` and ``metrics.json`` in the run directory and prints a table.

Embedded local Ray (no address)::

    .venv/bin/python jobs/pipeline.py --config configs/demo-cpu.yaml

On a cluster (``RAY_ADDRESS`` or ``--address``)::

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo-cpu.yaml \
        run_dir=s3://bucket/runs/demo

Overrides are dotted ``key=value`` pairs: ``train.lora.r=16 stages=[ingest,prepare]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402
from mllm_msr.config import PipelineConfig  # noqa: E402
from mllm_msr.pipeline import format_run_summary, run_pipeline  # noqa: E402


def main(cfg: PipelineConfig, force: list[str] | None = None) -> dict:
    cli.start(cfg)
    summary = run_pipeline(cfg, force=force)
    print()
    print(format_run_summary(summary))
    if "metrics" in summary:
        from mllm_msr.report import format_metrics_table

        m = summary["metrics"]
        print(f"\n{m.get('split', 'test')} metrics (x100):")
        print(format_metrics_table(m["methods"], ks=m.get("ks", (1, 3, 5, 10)), fmt="text"))
    print(f"\nrun directory: {summary['run_dir']}  ({summary['seconds']:.0f} s)")
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, "train.lora.r=16 stages=[ingest,prepare]")
    p.add_argument("--force", nargs="*", default=None, help="stages to rerun (and later)")
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    main(cli.config_from_args(args), force=args.force)
