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
from mllm_msr.pipeline import format_run_summary, run_pipeline  # noqa: E402


def main(cfg: PipelineConfig, force: list[str] | None = None, dry_run: bool = False) -> dict:
    cli.start(cfg, ray=False)  # the pipeline starts or joins Ray when a stage has to run
    summary = run_pipeline(cfg, force=force, dry_run=dry_run)
    if dry_run:
        return summary
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
    p.add_argument(
        "--force", nargs="*", default=None, help="stages to run fresh (the stages after them too)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and why; run nothing")
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    if args.force:  # `--force train train.lr=1e-4`: the key=value words are overrides
        args.overrides += [f for f in args.force if "=" in f]
        args.force = [f for f in args.force if "=" not in f]
    main(cli.config_from_args(args), force=args.force, dry_run=args.dry_run)
