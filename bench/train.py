"""Benchmark: recommender fine-tuning throughput and per-rank memory under ZeRO-2 and ZeRO-3.

Runs the real training stage (:func:`mllm_msr.stages.train.run_train`: Ray Train + DeepSpeed +
LoRA) on a synthetic task for each (ZeRO stage, number of workers) and reports:

* ``samples_per_s_per_worker``: micro batch x accumulation steps / median optimizer-step time;
* ``rank_state_bytes``: per rank, bytes of model parameters held (ZeRO-3 partitions them), of the
  fp32 partition of trainable parameters that gradients are reduced into, and of optimizer state.
  Expected: ZeRO-3 holds about 1/N of ZeRO-2's parameters on N ranks.

Each run starts fresh in a temporary run directory; step times exclude start-up. On the 2-core
CPU machine every worker shares the same two cores, so 2 workers do not double throughput.

    .venv/bin/python bench/train.py --workers 1 2 --stages 2 3 --steps 12
    .venv/bin/python bench/train.py --model tiny:qwen2-vl train.image_size=224 train.max_length=384
    # where a step's time goes, plain vs batched by length, on the same ragged samples:
    .venv/bin/python bench/train.py --workers 2 --stages 2 --ragged --length-bucket 8 \
        --model tiny:qwen2 train.family=qwen2 train.multimodal=false train.micro_batch_size=4
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr.config import load_config  # noqa: E402
from mllm_msr.data import schema  # noqa: E402
from mllm_msr.runtime import RunDir, init_ray  # noqa: E402
from mllm_msr.stages.train import run_train  # noqa: E402

COLORS = {"Red": (220, 30, 30), "Blue": (30, 30, 220), "Green": (30, 200, 30)}


def _png(rgb: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 96), rgb).save(buf, "PNG")
    return buf.getvalue()


def synthetic_tables(n_users: int, seed: int = 0, ragged: bool = False) -> dict[str, pa.Table]:
    """Users who like one colour; the positive has that colour, the negative another.

    ``ragged``: preference texts of very different lengths (1 to 40 history titles, a long
    tail as in MicroLens-50k with its whole history), where padding costs the most."""
    rng = random.Random(seed)
    names = [f"{c} {k}" for c in COLORS for k in range(8)]
    images = {c: _png(rgb) for c, rgb in COLORS.items()}
    items = pa.Table.from_pydict(
        {
            "item_id": names,
            "title": names,
            "text": [""] * len(names),
            "images": [[images[n.split()[0]]] for n in names],
            "image_hashes": [[n] for n in names],
            "image_hash": names,
        },
        schema=schema.ITEMS,
    )
    seqs: dict[str, list] = {"user_id": [], "split": [], "history": [], "target": []}
    cands: dict[str, list] = {"user_id": [], "split": [], "item_id": [], "label": []}
    prefs: dict[str, list] = {k: [] for k in schema.PREFERENCES.names}
    for u in range(n_users):
        liked = rng.choice(list(COLORS))
        other = rng.choice([c for c in COLORS if c != liked])
        history = [f"{liked} {rng.randrange(8)}" for _ in range(6)]
        split = "train" if u < n_users * 0.9 else "val"
        seqs["user_id"].append(f"u{u}")
        seqs["split"].append(split)
        seqs["history"].append(history)
        seqs["target"].append(f"{liked} {rng.randrange(8)}")
        for item, label in ((seqs["target"][-1], 1), (f"{other} {rng.randrange(8)}", 0)):
            cands["user_id"].append(f"u{u}")
            cands["split"].append(split)
            cands["item_id"].append(item)
            cands["label"].append(label)
        n_recent = min(40, int(rng.paretovariate(1.2))) if ragged else 0
        recent = "".join(f" Recently: {liked} {rng.randrange(8)}." for _ in range(n_recent))
        for k, v in zip(
            schema.PREFERENCES.names,
            (
                f"u{u}",
                6,
                f"The user appears to have a preference for {liked.lower()} covers." + recent,
                True,
                "synthetic",
                "synthetic/v1",
            ),
        ):
            prefs[k].append(v)
    return {
        "items": items,
        "sequences": pa.Table.from_pydict(seqs, schema=schema.SEQUENCES),
        "candidates": pa.Table.from_pydict(cands, schema=schema.CANDIDATES),
        "preferences": pa.Table.from_pydict(prefs, schema=schema.PREFERENCES),
    }


def bench_one(args, stage: int, workers: int, root: Path, extra: tuple[str, ...] = ()) -> dict:
    run_dir = root / f"zero{stage}-w{workers}-{len(extra)}"
    cfg = load_config(
        args.config,
        [
            f"run_dir={run_dir}",
            f"train.model={args.model}",
            f"train.zero.stage={stage}",
            f"train.num_workers={workers}",
            f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.steps}",
            "train.log_every=1000",
            "train.eval_samples=0",
            *args.overrides,
            *extra,
        ],
    )
    run = RunDir(str(run_dir))
    for name, table in synthetic_tables(args.users, ragged=args.ragged).items():
        run.write_table(name, table)
    t0 = time.perf_counter()
    summary = run_train(cfg, run, fresh=True, log=lambda *_: None)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return {
        "zero_stage": stage,
        "workers": workers,
        "steps": summary["steps"],
        "step_seconds_median": summary["step_seconds"],
        "samples_per_s_per_worker": round(per_step / summary["step_seconds"], 2),
        "samples_per_s_total": round(workers * per_step / summary["step_seconds"], 2),
        "rank_state_bytes": summary["rank_state_bytes"],
        "loss_first_last": [summary["first_loss"], summary["final_loss"]],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "phase_seconds": summary["phase_seconds"],
        "length_bucket": cfg.train.length_bucket,
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
    }


def main(args: argparse.Namespace) -> dict:
    init_ray(num_cpus=args.num_cpus)
    report = {"host": platform.node(), "model": args.model, "overrides": args.overrides, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for stage in args.stages:
            for workers in args.workers:
                row = bench_one(args, stage, workers, Path(tmp))
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
                if args.length_bucket > 1:  # the same samples, batched by length
                    bucketed = bench_one(
                        args,
                        stage,
                        workers,
                        Path(tmp),
                        (f"train.length_bucket={args.length_bucket}",),
                    )
                    bucketed["step_time_ratio_vs_plain"] = round(
                        bucketed["step_seconds_median"] / row["step_seconds_median"], 3
                    )
                    report["runs"].append(bucketed)
                    print(json.dumps(bucketed), flush=True)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo-cpu.yaml")
    p.add_argument("--model", default="tiny:qwen2-vl")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--users", type=int, default=120)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument(
        "--length-bucket",
        type=int,
        default=1,
        help="also run each setting with train.length_bucket=N on the same samples and "
        "report the step-time ratio (bucketed / plain)",
    )
    p.add_argument(
        "--ragged", action="store_true", help="preference texts of very different lengths"
    )
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. train.image_size=224"
    )
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())
