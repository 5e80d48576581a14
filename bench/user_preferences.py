"""Benchmark: wavefront batching across users vs one user at a time (the reference code's way).

Both ways run the same recurrence (:func:`mllm_msr.stages.user_preferences.wavefront`) on the
same in-process vLLM engine; only the batching differs:

* ``wavefront``: users in batches of ``--users-per-batch``; round k sends block k of every user
  of the batch as one engine call (K calls per batch);
* ``sequential``: one user at a time, one block per engine call (K calls per user), as the
  reference code does. Its cost is linear in the number of users, so it runs on the first
  ``--sequential-users`` users only; its users/s is what the full set would get.

Synthetic users: histories of ``--min-items``..``--max-items`` items (3-5 blocks of 3 by
default) over a catalog with titles and ~25-word item summaries. Greedy decoding: the texts of
both ways are compared on the sequential subset. Prints a JSON report (and writes it with
``--out``).

    .venv/bin/python bench/user_preferences.py --users 500 5000 --sequential-users 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr.config import EngineConfig, SamplingConfig, UserPreferencesConfig  # noqa: E402
from mllm_msr.stages.user_preferences import (  # noqa: E402
    HistoryItem,
    UserWork,
    WavefrontStats,
    engine_generate,
    wavefront,
)

WORDS = (
    "red blue green dark bright poster cover city forest ocean night neon portrait smiling "
    "cartoon anime dog cat car mountain kitchen recipe guitar concert football dance travel "
    "vintage minimal bold text logo soft pastel crowd street sunset studio toy baby game"
).split()


def make_users(n: int, min_items: int, max_items: int, n_items: int, seed: int) -> list[UserWork]:
    """``n`` users with random histories over a synthetic catalog (seeded)."""
    rng = random.Random(seed)
    catalog = []
    for j in range(n_items):
        title = " ".join(rng.choice(WORDS) for _ in range(3)).title()
        summary = "A cover showing " + " ".join(rng.choice(WORDS) for _ in range(22)) + "."
        catalog.append(HistoryItem(f"i{j}", title, summary))
    return [
        UserWork(f"u{u:06d}", rng.sample(catalog, rng.randint(min_items, max_items)))
        for u in range(n)
    ]


def run_wavefront(
    users: list[UserWork], generate, up: UserPreferencesConfig, per_batch: int
) -> tuple[dict, WavefrontStats]:
    total = WavefrontStats()
    chains: dict = {}
    t0 = time.perf_counter()
    for i in range(0, len(users), per_batch):
        c, s = wavefront(users[i : i + per_batch], generate, up)
        chains.update(c)
        total.add(s)
    total.seconds = time.perf_counter() - t0
    return chains, total


def report(name: str, stats: WavefrontStats) -> dict:
    return {
        "mode": name,
        "users": stats.users,
        "blocks": stats.blocks,
        "engine_calls": stats.engine_calls,
        "empty_outputs": stats.empty_outputs,
        "seconds": round(stats.seconds, 2),
        "users_per_s": round(stats.users / stats.seconds, 3),
        "blocks_per_s": round(stats.blocks / stats.seconds, 3),
    }


def run_stage(users: list[UserWork], up: UserPreferencesConfig, args: argparse.Namespace) -> dict:
    """The whole stage (Ray Data actor, its own engine, part files) on ``users``."""
    import shutil
    import tempfile

    import pyarrow as pa
    import ray

    from mllm_msr.config import PipelineConfig, RayConfig
    from mllm_msr.data import schema
    from mllm_msr.runtime import RunDir, cpu_env_defaults
    from mllm_msr.stages.user_preferences import run_user_preferences

    root = tempfile.mkdtemp(prefix="bench-up-")
    ray_tmp = tempfile.mkdtemp(prefix="bup-ray-")
    env = {k: os.environ.get(k, v) for k, v in cpu_env_defaults().items()}
    # A private local cluster: never attach to another cluster running on this host.
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        object_store_memory=500_000_000,
        include_dashboard=False,
        _temp_dir=ray_tmp,
        runtime_env={"env_vars": env},
    )
    try:
        cfg = PipelineConfig(run_dir=root, ray=RayConfig(num_cpus=os.cpu_count()))
        cfg.user_preferences = up
        up.pool.batch_size = args.users_per_batch
        if args.cache_dir:
            cfg.cache_dir = args.cache_dir
        run = RunDir(root)
        items = {i.item_id: i for w in users for i in w.items}
        run.write_table(
            "items",
            pa.Table.from_pylist(
                [
                    {
                        "item_id": i.item_id,
                        "title": i.title,
                        "text": "",
                        "images": [],
                        "image_hashes": [],
                        "image_hash": "",
                    }
                    for i in items.values()
                ],
                schema=schema.ITEMS,
            ),
        )
        run.write_table(
            "item_summaries",
            pa.table(
                {
                    "item_id": [i.item_id for i in items.values()],
                    "summary": [i.summary for i in items.values()],
                }
            ),
        )
        run.write_table(
            "sequences",
            pa.Table.from_pylist(
                [
                    {
                        "user_id": w.user_id,
                        "split": "train",
                        "history": [i.item_id for i in w.items],
                        "target": "none",
                    }
                    for w in users
                ],
                schema=schema.SEQUENCES,
            ),
        )
        t0 = time.perf_counter()
        summary = run_user_preferences(cfg, run)
        seconds = time.perf_counter() - t0
        rerun = run_user_preferences(cfg, run)
        return {
            "users": summary["rows_out"],
            "blocks": summary["blocks"],
            "engine_calls": summary["engine_calls"],
            "seconds_with_ray_and_engine_start": round(seconds, 2),
            "users_per_s": round(summary["rows_out"] / seconds, 3),
            "rerun_seconds": rerun["seconds"],
            "rerun_engine_calls": rerun["engine_calls"],
        }
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main(args: argparse.Namespace) -> dict:
    from mllm_msr.engines.vllm import VLLMEngine

    up = UserPreferencesConfig(
        engine=EngineConfig(
            model=args.model,
            family=args.family,
            dtype=args.dtype,
            max_num_seqs=args.users_per_batch,
            max_model_len=2048,
        ),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0),
        block_size=args.block_size,
    )
    t0 = time.perf_counter()
    engine = VLLMEngine(up.engine, cache_dir=args.cache_dir)
    startup = time.perf_counter() - t0
    generate = engine_generate(engine, up)
    out: dict = {
        "model": args.model,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "block_size": args.block_size,
        "history_items": [args.min_items, args.max_items],
        "users_per_batch": args.users_per_batch,
        "engine_startup_s": round(startup, 2),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "load_avg_start": os.getloadavg()[0],
        "runs": [],
    }
    # Warm-up (kernels, caches) outside the timings.
    warm = make_users(8, args.min_items, args.max_items, args.catalog, seed=10_000)
    run_wavefront(warm, generate, up, args.users_per_batch)

    largest = max(args.users)
    users_all = make_users(largest, args.min_items, args.max_items, args.catalog, args.seed)
    seq_users = users_all[: args.sequential_users]

    seq_chains: dict = {}
    seq = WavefrontStats()
    t0 = time.perf_counter()
    for w in seq_users:
        c, s = wavefront([w], generate, up)
        seq_chains.update(c)
        seq.add(s)
    seq.seconds = time.perf_counter() - t0
    out["runs"].append(report("sequential", seq))
    print(json.dumps(out["runs"][-1]), flush=True)

    for n in sorted(args.users):
        chains, stats = run_wavefront(users_all[:n], generate, up, args.users_per_batch)
        out["runs"].append(report("wavefront", stats))
        print(json.dumps(out["runs"][-1]), flush=True)
        if n == min(args.users):
            same = sum(chains[u] == seq_chains[u] for u in seq_chains)
            out["sequential_vs_wavefront_identical_users"] = f"{same}/{len(seq_chains)}"
    engine.close()

    wf = [r for r in out["runs"] if r["mode"] == "wavefront"]
    seq_r = out["runs"][0]
    out["speedup_users_per_s"] = round(wf[0]["users_per_s"] / seq_r["users_per_s"], 1)
    out["engine_calls_per_user"] = {
        "sequential": round(seq_r["engine_calls"] / seq_r["users"], 2),
        "wavefront": round(wf[0]["engine_calls"] / wf[0]["users"], 3),
    }
    if len(wf) > 1:
        out["scaling"] = [
            {"users": r["users"], "seconds": r["seconds"], "users_per_s": r["users_per_s"]}
            for r in wf
        ]
    if args.stage_users:
        out["stage"] = run_stage(users_all[: args.stage_users], up, args)
        print(json.dumps(out["stage"]), flush=True)
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[500, 5000])
    p.add_argument("--sequential-users", type=int, default=40)
    p.add_argument("--users-per-batch", type=int, default=256)
    p.add_argument("--min-items", type=int, default=9)
    p.add_argument("--max-items", type=int, default=15)
    p.add_argument("--block-size", type=int, default=3)
    p.add_argument("--catalog", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--model", default="tiny:qwen2")
    p.add_argument("--family", default="qwen2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stage-users",
        type=int,
        default=0,
        help="also time the whole stage (embedded Ray, actor, part files) on this many users",
    )
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())
