"""GPU smoke check of the training and scoring code paths (no Ray, no vLLM: one process, one GPU).

Runs on a CUDA machine with torch, transformers, peft and deepspeed importable:

    PYTHONPATH=. python bench/gpu_check.py --out gpu_check.json

1. Builds the tiny Qwen2-VL offline and a learnable Yes/No task from the demo catalog (the answer
   is "Yes" when the candidate's colour is the one the preference names).
2. For ZeRO stage 2 and 3 (bf16, LoRA on q/v, our DeepSpeed and peft adapters and the training
   collator): trains N steps on one GPU, and reports first/last loss, median step time, peak GPU
   memory, whether the base weights stayed fixed and the adapter moved.
3. Scores 21-candidate groups with :class:`~mllm_msr.recommender.score.YesNoScorer` in fp32 and bf16:
   rows/s and how many groups are fully tied (DESIGN.md: bf16 collapses scores into ties).

With ``--families`` (e.g. ``--families all``), for each tiny twin of a shipped config's family
(:data:`FAMILY_RUNS`, at that config's ``image_size`` and ``max_length``) it trains ZeRO-2 bf16
and scores fp32, reporting per family the prompt length in tokens of a typical training sample,
the median step time, peak memory and score rows/s. Never imports Ray or vLLM (checked).

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


FAMILY_RUNS: dict[str, dict] = {
    # twin: the config whose settings it runs with (image_size, max_length, multimodal)
    "qwen2-vl": {"config": "demo-cpu.yaml", "image_size": 224, "max_length": 512},
    "qwen2.5-vl": {"config": "qwen2.5-vl.yaml", "image_size": 448, "max_length": 1024},
    "llava": {"config": "(none: LLaVA-1.5 family)", "image_size": 112, "max_length": 512},
    "llava-next": {"config": "paper-llava.yaml", "image_size": 336, "max_length": 2048},
    "qwen2.5": {"config": "(text recommender)", "multimodal": False, "max_length": 512},
    "llama3": {"config": "(text recommender)", "multimodal": False, "max_length": 512},
    "smollm2": {"config": "microlens-50k-smollm2.yaml", "multimodal": False, "max_length": 512},
}
"""Tiny twin -> the recommender settings of the shipped config it stands for."""


def train_check(
    stage: int,
    model_path: str,
    rows: list[dict],
    steps: int,
    image_size: int = 56,
    max_length: int = 512,
    multimodal: bool = True,
) -> dict:
    import torch

    from mllm_msr import families
    from mllm_msr.config import LoraConfig, TrainConfig, ZeroConfig
    from mllm_msr.engines import deepspeed as ds
    from mllm_msr.engines import peft as lora
    from mllm_msr.recommender.collate import RecommenderCollator
    from mllm_msr.recommender.score import load_recommender

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
        image_size=image_size,
        max_length=max_length,
        multimodal=multimodal,
    )
    torch.manual_seed(0)
    fam = families.resolve(model_path)
    collator = RecommenderCollator(
        families.load_processor(model_path, fam), max_length, image_size, multimodal, family=fam
    )
    base = load_recommender(model_path, None, "bf16", fam)
    model = lora.apply_lora(base, cfg.lora, fam)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = ds.initialize(model, cfg, world_size=1)
    prompt_tokens = [int(collator.encode(r)["input_ids"].shape[1]) for r in rows[:16]]
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
        "family": fam.name,
        "zero_stage": stage,
        "image_size": image_size if multimodal else None,
        "max_length": max_length,
        "image_tokens": collator.image_tokens,
        "prompt_tokens_median": int(statistics.median(prompt_tokens)),
        "steps": steps,
        "loss_first5": round(statistics.mean(losses[:5]), 4),
        "loss_last5": round(statistics.mean(losses[-5:]), 4),
        "median_step_s": round(statistics.median(times[2:] or times), 4),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "base_weights_fixed": base_fixed,
        "adapter_tensors_moved": f"{moved}/{len(adapter0)}",
    }


def score_check(
    model_path: str,
    rows: list[dict],
    precision: str,
    image_size: int = 56,
    max_length: int = 512,
    multimodal: bool = True,
    family: str | None = None,
) -> dict:
    import numpy as np

    from mllm_msr import families
    from mllm_msr.config import TrainConfig
    from mllm_msr.recommender.score import YesNoScorer

    family = family or families.resolve(model_path).name
    train = TrainConfig(
        image_size=image_size, max_length=max_length, multimodal=multimodal, family=family
    )
    scorer = YesNoScorer(model_path, None, train, precision, micro_batch=32)
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


def family_check(name: str, rows: list[dict], steps: int, score_rows: int) -> dict:
    """Train (ZeRO-2 bf16) and score (fp32) the twin ``name`` with its config's settings."""
    from mllm_msr import families
    from mllm_msr.tiny import TINY_SPECS, resolve_model

    if name not in FAMILY_RUNS:
        raise SystemExit(f"--families: unknown {name!r}; known: {sorted(FAMILY_RUNS)}")
    run = FAMILY_RUNS[name]
    settings = {
        "image_size": run.get("image_size", 56),
        "max_length": run["max_length"],
        "multimodal": run.get("multimodal", True),
    }
    path = resolve_model(f"tiny:{name}")
    out: dict = {"config": run["config"], "family": TINY_SPECS[name].family}
    try:
        out["train"] = train_check(2, path, rows, steps, **settings)
    except Exception as exc:  # report and go on: one failure must not hide the rest
        out["train"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        fam = families.resolve(path).name
        out["score"] = score_check(path, make_rows(score_rows, 1), "fp32", family=fam, **settings)
    except Exception as exc:
        out["score"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--score-rows", type=int, default=21 * 48)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--allow-cpu", action="store_true", help="dry-run on CPU (gloo)")
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        help=f"twins to train (ZeRO-2 bf16) and score (fp32): 'all' or of {sorted(FAMILY_RUNS)}",
    )
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
    from mllm_msr.runtime import cpu_only_env, hub_env, process_env

    # The per-node settings a Ray worker on this node would get: CPU-only ones only without a GPU.
    node_env = {**process_env(os.environ["MLLM_MSR_CACHE"], gpu=cuda), **hub_env(True)}
    os.environ.update(node_env)
    cpu_keys = sorted(set(cpu_only_env()) & set(os.environ))
    import deepspeed

    from mllm_msr.tiny import resolve_model

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    model_path = resolve_model("tiny:qwen2-vl")
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "node_env": node_env,
        "cpu_only_settings_in_env": cpu_keys,
    }
    rows = make_rows(512)
    if args.families:
        names = sorted(FAMILY_RUNS) if args.families == ["all"] else args.families
        report["families"] = {
            name: family_check(name, rows, args.steps, args.score_rows) for name in names
        }
        report["imported_ray_or_vllm"] = sorted({"ray", "vllm"} & set(sys.modules))
        text = json.dumps(report, indent=2)
        print(text)
        Path(args.out).write_text(text)
        return
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
