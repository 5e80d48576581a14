"""Prepare the protocol: k-core, chronological sequences, user split, seeded candidates.

Writes sequences/, candidates/ and quarantine/prepare/ under the run directory, through the
pipeline's stage contract (skipped when its completion record matches the config and inputs;
``--force`` reruns it, ``--dry-run`` says whether it would run and why).

Embedded local Ray (no address)::

    .venv/bin/python jobs/prepare.py --config configs/microlens-50k.yaml

On a cluster::

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/microlens-50k.yaml \\
        run_dir=s3://bucket/runs/microlens-50k

Overrides are dotted ``key=value`` pairs, e.g. ``prepare.seed=7``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "prepare"


def make_parser():
    return cli.stage_parser(__doc__, cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, __doc__)
