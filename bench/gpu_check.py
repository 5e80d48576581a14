"""GPU smoke check of the training and scoring code paths (no Ray, no vLLM: one process, one GPU).

Runs on a CUDA machine with torch, transformers, peft and deepspeed importable:

    PYTHONPATH=. python bench/gpu_check.py --out gpu_check.json

1. Builds the tiny Qwen2-VL offline and a learnable Yes/No task from the demo catalog (the answer
   is "Yes" when the candidate's colour is the one the preference names).
2. For ZeRO stage 2 and 3 (bf16, LoRA on q/v, our DeepSpeed and peft adapters and the training
   collator): trains N steps on one GPU, and reports first/last loss, median step time, peak GPU
   memory, whether the base weights stayed fixed and the adapter moved.
3. Scores 21-candidate groups with :class:`~mllm_msr.stages.score.YesNoScorer` in fp32 and bf16:
   rows/s and how many groups are fully tied (DESIGN.md: bf16 collapses scores into ties).

Prints one JSON document and writes it to ``--out``. Figures are for a tiny random model: they
check the code paths and give a throughput order of magnitude, not model-size figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    from mllm_msr.data.demo import CATEGORIES, draw_item_image, item_category, item_title

    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        liked = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        i = int(rng.integers(0, 200))
        cat = CATEGORIES[item_category(i)]
        rows.append(
            {
                "user_id": f"u{k // 21}",
                "item_id": f"i{i}",
                "label": int(cat.name == liked.name),
                "preference": f"The user likes {liked.colour_name} {liked.shape} items.",
                "title": item_title(i, seed),
                "summary": "",
                "image": draw_item_image(i, seed),
            }
        )
    return rows


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_check(stage: int, model_path: str, rows: list[dict], steps: int) -> dict:
    import torch
    from transformers import AutoProcessor

    from mllm_msr.config import LoraConfig, TrainConfig, ZeroConfig
    from mllm_msr.engines import deepspeed as ds
    from mllm_msr.engines import peft as lora
    from mllm_msr.stages.collate import RecommenderCollator
    from mllm_msr.stages.score import load_recommender

    cfg = TrainConfig(
        model=model_path,
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
        zero=ZeroConfig(stage=stage),
        num_workers=1,
        use_gpu=torch.cuda.is_available(),
        precision="bf16",
        learning_rate=2e-3,
        micro_batch_size=8,
        grad_accum_steps=1,
        image_size=56,
        max_length=512,
    )
    torch.manual_seed(0)
    base = load_recommender(model_path, None, "bf16")
    model = lora.apply_lora(base, cfg.lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = ds.initialize(model, cfg, world_size=1)
    collator = RecommenderCollator(AutoProcessor.from_pretrained(model_path), 512, 56, True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    engine.train()
    for step in range(steps):
        chunk = [rows[(step * 8 + j) % len(rows)] for j in range(8)]
        batch = {k: v.to(engine.device) for k, v in collator(chunk).items()}
        _sync()
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    with ds.gathered(list(engine.module.parameters()), stage):
        params = dict(engine.module.named_parameters())
        base_fixed = all(torch.equal(params[n].detach().cpu(), v.cpu()) for n, v in frozen.items())
        moved = sum(not torch.equal(params[n].detach().cpu(), v.cpu()) for n, v in adapter0.items())
    return {
        "zero_stage": stage,
        "steps": steps,
        "loss_first5": round(statistics.mean(losses[:5]), 4),
        "loss_last5": round(statistics.mean(losses[-5:]), 4),
        "median_step_s": round(statistics.median(times[2:]), 4),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "base_weights_fixed": base_fixed,
        "adapter_tensors_moved": f"{moved}/{len(adapter0)}",
    }


def score_check(model_path: str, rows: list[dict], precision: str) -> dict:
    import numpy as np

    from mllm_msr.config import TrainConfig
    from mllm_msr.stages.score import YesNoScorer

    scorer = YesNoScorer(model_path, None, TrainConfig(image_size=56), precision, micro_batch=32)
    scorer.score_rows(rows[:32])  # warm-up
    _sync()
    t0 = time.perf_counter()
    scores = scorer.score_rows(rows)
    _sync()
    seconds = time.perf_counter() - t0
    groups = [scores[g : g + 21] for g in range(0, len(scores) - 20, 21)]
    return {
        "precision": precision,
        "rows": len(rows),
        "rows_per_s": round(len(rows) / seconds, 1),
        "distinct_scores": int(len(np.unique(scores))),
        "fully_tied_groups": f"{sum(len(np.unique(g)) == 1 for g in groups)}/{len(groups)}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--score-rows", type=int, default=21 * 48)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--allow-cpu", action="store_true", help="dry-run on CPU (gloo)")
    args = p.parse_args()
    os.environ.setdefault("MLLM_MSR_CACHE", "/tmp/mllm_msr_cache")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("no CUDA device (pass --allow-cpu to dry-run the script on CPU)")
    import deepspeed

    from mllm_msr.tiny import resolve_model

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    model_path = resolve_model("tiny:qwen2-vl")
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
    }
    rows = make_rows(512)
    for stage in (2, 3):
        try:
            report[f"train_zero{stage}"] = train_check(stage, model_path, rows, args.steps)
        except Exception as exc:  # report and go on: one failure must not hide the rest
            report[f"train_zero{stage}"] = {"error": f"{type(exc).__name__}: {exc}"}
    score_rows = make_rows(args.score_rows, seed=1)
    for precision in ("fp32", "bf16"):
        try:
            report[f"score_{precision}"] = score_check(model_path, score_rows, precision)
        except Exception as exc:
            report[f"score_{precision}"] = {"error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
