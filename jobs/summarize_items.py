"""Summarize every item of a run's ``items/`` table with a multimodal LLM (MLLM-MSR stage 1).

Reads ``<run_dir>/items/``, writes ``<run_dir>/item_summaries/`` and
``<run_dir>/quarantine/item_summaries/``. Resumable: a rerun after a crash only summarizes the
items left; once the stage is complete a rerun does nothing (``--force`` ignores the completion
marker, yet items whose summary is current for their image, model and prompt are still kept).

Embedded local Ray (no address)::

    .venv/bin/python jobs/summarize_items.py --config configs/demo-cpu.yaml

On a cluster (4 engine actors with one GPU each)::

    ray job submit --working-dir . -- python jobs/summarize_items.py \
        --config configs/paper-llava.yaml run_dir=s3://bucket/runs/paper \
        item_summaries.pool.concurrency=4 item_summaries.pool.num_gpus=1

Overrides are dotted ``key=value`` pairs, e.g. ``item_summaries.sampling.max_new_tokens=64``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402
from mllm_msr.config import PipelineConfig  # noqa: E402
from mllm_msr.stages.item_summaries import STAGE, run_item_summaries  # noqa: E402


def main(cfg: PipelineConfig, force: bool = False) -> dict:
    run = cli.start(cfg, ray=False)  # the stage starts or joins Ray only when there is work
    if force:
        run.clear_stage(STAGE)
    summary = run_item_summaries(cfg, run)
    cli.print_summary(summary, run)
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, "item_summaries.pool.concurrency=2")
    p.add_argument("--force", action="store_true", help="run even if marked complete")
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    main(cli.config_from_args(args), force=args.force)
