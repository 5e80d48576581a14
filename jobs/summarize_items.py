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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr.config import PipelineConfig, load_config  # noqa: E402
from mllm_msr.runtime import RunDir  # noqa: E402
from mllm_msr.stages.item_summaries import STAGE, run_item_summaries  # noqa: E402


def main(cfg: PipelineConfig, force: bool = False) -> dict:
    run = RunDir(cfg.run_dir)
    if force:
        run.clear_stage(STAGE)
    summary = run_item_summaries(cfg, run)  # starts or joins Ray only when there is work
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo-cpu.yaml", help="YAML config file")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--force", action="store_true", help="run even if the stage is marked complete")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. item_summaries.pool.concurrency=2"
    )
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    main(load_config(args.config, overrides), force=args.force)
