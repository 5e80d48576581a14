"""Summarize user preferences: recurrent (or direct) LLM summaries of each user's history.

Reads sequences/, items/ and item_summaries/; writes preferences/ (every intermediate state, the
last one per user marked final) and quarantine/user_preferences/. Incremental: states whose
inputs are unchanged are reused, and after new interactions only the new blocks are summarized.
``--force`` recomputes every state; ``--dry-run`` says whether it would run and why.

Embedded local Ray (no address)::

    .venv/bin/python jobs/user_preferences.py --config configs/demo-cpu.yaml

On a cluster::

    ray job submit --working-dir . -- python jobs/user_preferences.py \\
        --config configs/qwen2.5-vl.yaml run_dir=s3://bucket/runs/microlens-50k

Overrides are dotted ``key=value`` pairs, e.g. ``user_preferences.mode=direct``
(the no-recurrence ablation), ``user_preferences.use_item_summaries=false`` (titles only),
``user_preferences.pool.batch_size=256`` (users per wavefront batch).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "user_preferences"


def make_parser():
    return cli.stage_parser(__doc__, cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, __doc__)
