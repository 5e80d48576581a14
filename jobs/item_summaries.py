"""Summarize every item of a run's ``items/`` table with a multimodal LLM (MLLM-MSR stage 1).

Reads ``<run_dir>/items/``, writes ``<run_dir>/item_summaries/`` and
``<run_dir>/quarantine/item_summaries/``. Incremental: items whose summary is current for their
image, model, generation settings and prompt are kept, the rest are summarized; a rerun after a
crash only does the items left. ``--force`` summarizes every item again (the earlier summaries
are removed only after the new ones are written); ``--dry-run`` says whether it would run.

Embedded local Ray (no address)::

    .venv/bin/python jobs/item_summaries.py --config configs/demo-cpu.yaml

On a cluster (4 engine actors with one GPU each)::

    ray job submit --working-dir . -- python jobs/item_summaries.py \\
        --config configs/paper-llava.yaml run_dir=s3://bucket/runs/paper \\
        item_summaries.pool.concurrency=4 item_summaries.pool.num_gpus=1

Overrides are dotted ``key=value`` pairs, e.g. ``item_summaries.sampling.max_new_tokens=64``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "item_summaries"


def make_parser():
    return cli.stage_parser(__doc__, cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, __doc__)
