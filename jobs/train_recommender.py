"""Fine-tune the recommender (LoRA on the multimodal LLM) with Ray Train + DeepSpeed ZeRO.

Reads candidates/, sequences/, items/, item_summaries/ and preferences/ from the run directory;
writes Ray Train checkpoints to ``train/``, the peft adapter to ``adapter/`` (merged weights to
``merged/`` with ``train.merge_adapter=true``) and the stage marker ``_stages/train.json``.
Re-running resumes from the latest checkpoint in ``train/``; ``--fresh`` starts over.

Embedded local Ray (no address)::

    .venv/bin/python jobs/train_recommender.py --config configs/demo-cpu.yaml

On a cluster (4 GPU workers, ZeRO-3)::

    ray job submit --working-dir . -- python jobs/train_recommender.py \
        --config configs/qwen2.5-vl.yaml run_dir=s3://bucket/runs/qwen \
        train.num_workers=4 train.use_gpu=true train.zero.stage=3

Overrides are dotted ``key=value`` pairs, e.g. ``train.max_steps=100 train.lora.r=16``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr import cli  # noqa: E402
from mllm_msr.config import PipelineConfig  # noqa: E402
from mllm_msr.stages.train import run_train  # noqa: E402


def main(cfg: PipelineConfig, fresh: bool = False) -> dict:
    run = cli.start(cfg)
    summary = run_train(cfg, run, fresh=fresh)
    print(f"adapter: {summary['adapter']}")
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, "train.max_steps=100")
    p.add_argument("--fresh", action="store_true", help="delete earlier checkpoints first")
    return p


if __name__ == "__main__":
    args = make_parser().parse_intermixed_args()
    main(cli.config_from_args(args), fresh=args.fresh)
