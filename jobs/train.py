"""Fine-tune the recommender (LoRA on the multimodal LLM) with Ray Train + DeepSpeed ZeRO.

Reads candidates/, sequences/, items/, item_summaries/ and preferences/ from the run directory;
writes Ray Train checkpoints to ``train/`` and the peft adapter to ``adapter/`` (merged weights
to ``merged/`` with ``train.merge_adapter=true``). A rerun resumes from the latest checkpoint
only when it was trained on the same samples and settings (otherwise training starts over);
``--force`` starts over; ``--dry-run`` says whether it would run and why.

Embedded local Ray (no address)::

    .venv/bin/python jobs/train.py --config configs/demo-cpu.yaml

On a cluster (4 GPU workers, ZeRO-3)::

    ray job submit --working-dir . -- python jobs/train.py \\
        --config configs/qwen2.5-vl.yaml run_dir=s3://bucket/runs/qwen \\
        train.num_workers=4 train.use_gpu=true train.zero.stage=3

Overrides are dotted ``key=value`` pairs, e.g. ``train.max_steps=100 train.lora.r=16``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402

STAGE = "train"


def make_parser():
    return cli.stage_parser(__doc__, cli.EXAMPLES[STAGE])


if __name__ == "__main__":
    cli.stage_main(STAGE, __doc__)
