"""Evaluate a run: score the test candidates, write scores/ and metrics.json.

Scores the run's adapter (``<run_dir>/adapter/``, whatever ``stages`` says) next to the
configured baselines, under the paper's protocol; score files of methods not scored this time
are removed. Re-evaluating a finished run (e.g. with other ``evaluate.ks`` or baselines)::

    .venv/bin/python jobs/evaluate.py --config configs/demo-cpu.yaml \\
        'evaluate.baselines=[popularity,sasrec,zero_shot]'

On a cluster::

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --config configs/qwen2.5-vl.yaml run_dir=s3://bucket/runs/qwen

``--force`` re-scores even when up to date; ``--dry-run`` says whether it would run and why.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "evaluate"


def make_parser():
    return cli.stage_parser(__doc__, cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, __doc__)
