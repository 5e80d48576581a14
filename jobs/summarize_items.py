"""Alias of ``jobs/item_summaries.py`` (this job's earlier name): the same code, flags and help.

.venv/bin/python jobs/summarize_items.py --config configs/demo-cpu.yaml   # = jobs/item_summaries.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "item_summaries"


def make_parser():
    return cli.stage_parser(cli.job_doc(STAGE), cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, cli.job_doc(STAGE))
