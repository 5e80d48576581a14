"""Summarize user preferences: recurrent (or direct) LLM summaries of each user's history.

Reads sequences/, items/ and item_summaries/; writes preferences/ (every intermediate state, the
last one per user marked final), quarantine/user_preferences.parquet and the stage marker
``_stages/user_preferences.json`` (its summary). Rerunning is cheap and safe: batches whose part
file exists are skipped, and after new interactions (longer histories in sequences/) only the
new blocks are summarized, continuing from each user's stored states.

Embedded local Ray (no address)::

    .venv/bin/python jobs/summarize_users.py --config configs/demo-cpu.yaml

On a cluster::

    ray job submit --working-dir . -- python jobs/summarize_users.py \\
        --config configs/qwen2.5-vl.yaml run_dir=s3://bucket/runs/microlens-50k

Overrides are dotted ``key=value`` pairs, e.g. ``user_preferences.mode=direct``
(the no-recurrence ablation), ``user_preferences.use_item_summaries=false`` (titles only),
``user_preferences.pool.batch_size=256`` (users per wavefront batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402
from mllm_msr.config import PipelineConfig  # noqa: E402
from mllm_msr.stages.user_preferences import run_user_preferences  # noqa: E402


def main(cfg: PipelineConfig) -> dict:
    run = cli.start(cfg)
    summary = run_user_preferences(cfg, run)
    cli.print_summary(summary, run)
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, "user_preferences.block_size=3")
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    main(cli.config_from_args(args))
