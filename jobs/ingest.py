"""Ingest a raw dataset into items/, interactions/ and quarantine/ingest/ (Parquet).

Runs the ingest stage through the pipeline's stage contract: it is skipped when its completion
record (``_stages/ingest.json``) matches the current config and its parts are intact, and rerun
(with the stages after it stale) when a setting that shapes it changed. ``--force`` reruns it,
``--dry-run`` says whether it would run and why.

Embedded local Ray (no address)::

    .venv/bin/python jobs/ingest.py --config configs/microlens-50k.yaml

On a cluster (the data root must be readable from the workers)::

    ray job submit --working-dir . -- python jobs/ingest.py --config configs/microlens-50k.yaml \\
        ingest.root=/mnt/data/microlens-50k run_dir=s3://bucket/runs/microlens-50k

Overrides are dotted ``key=value`` pairs, e.g. ``ingest.num_shards=8``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "ingest"


def make_parser():
    return cli.stage_parser(__doc__, cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, __doc__)
