"""Benchmark: wavefront batching across users vs one user at a time (the reference code's way).

Every way runs the same recurrence on the same in-process vLLM engine and sends the same
prompts; only the feeding differs:

* ``continuous`` (the stage's default, :func:`~mllm_msr.stages.user_preferences.
  continuous_wavefront`): users in batches of ``--users-per-batch``; each user's next block is
  queued in the engine as soon as their previous one is answered (the running batch stays
  full); ``engine_calls`` counts engine steps;
* ``wavefront`` (``feeding: rounds``, the reference path, :func:`~mllm_msr.stages.
  user_preferences.wavefront`): round k sends block k of every user of the batch as one
  synchronous engine call (K calls per batch);
* ``sequential``: one user at a time, one block per engine call (K calls per user), as the
  reference code does. Its cost is linear in the number of users, so it runs on the first
  ``--sequential-users`` users only; its users/s is what the full set would get. It runs after
  the wavefronts (their prompts are then in the prefix cache: in the loop's favour);
* ``raw``: the very requests the round-by-round wavefront sent for the smallest ``--users``
  set, replayed call by call on a fresh engine (same batches, nothing but ``LLM.generate``):
  the overhead over the bare engine (target >= 0.9). ``raw_vs_sequential`` is the ceiling of
  batching on this machine: what the bare engine gains by batching over the per-user loop;
* ``stage`` (``--stage-users``): the whole stage on an embedded Ray (actor, part files, the
  stage's feeding, ``--feeding``); its users/s counts the wall time from the first actor
  wavefront's start to the last one's end (``active_seconds``: engine start excluded).

Every engine, the stage's actor included, runs ``--cpu-threads`` OpenMP/torch threads
(``engine.cpu_threads``; default every core) and Ray's workers run at ``--worker-niceness``
(0), like this process. Without that the comparison is unfair: Ray gives an actor
``OMP_NUM_THREADS`` = its ``num_cpus`` (1) and nice 15, while an engine in this process used
both cores (the 0.70x "actor gap" of the first SmolLM2 record).

Workloads: ``--workload tiny`` (tiny random Qwen2, 16 new tokens) or ``smollm2``
(SmolLM2-135M-Instruct, ``pkg:smollm2`` from ``make bench-install``, 64 new tokens); ``--model``
and friends override. Ratios are refused when the load average exceeds the core count
(``--allow-load`` reports them, marked not quiet); the JSON record goes to
``bench/results/user_preferences/``.

Synthetic users: histories of ``--min-items``..``--max-items`` items (3-5 blocks of 3 by
default) over a catalog with titles and ~25-word item summaries. Greedy decoding: the texts of
both ways are compared on the sequential subset. Prints a JSON report (and writes it with
``--out``).

    .venv/bin/python bench/user_preferences.py --users 500 5000 --sequential-users 40
    .venv/bin/python bench/user_preferences.py --workload smollm2 --users 256 --stage-users 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr.bench_record import BenchRecord, add_arguments  # noqa: E402
from mllm_msr.config import EngineConfig, SamplingConfig, UserPreferencesConfig  # noqa: E402
from mllm_msr.stages.user_preferences import (  # noqa: E402
    HistoryItem,
    UserWork,
    WavefrontStats,
    continuous_wavefront,
    engine_feeder,
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


WORKLOADS = {
    "tiny": {"model": "tiny:qwen2", "family": "qwen2", "max_new_tokens": 16},
    "smollm2": {"model": "pkg:smollm2", "family": "smollm2", "max_new_tokens": 64},
}


def recording(generate, calls: list):
    """``generate`` that also appends each call's ``(chats, keys)`` to ``calls``."""

    def wrapped(chats, keys):
        calls.append((list(chats), list(keys)))
        return generate(chats, keys)

    return wrapped


def replay_raw(up: UserPreferencesConfig, calls: list, warm: list, cache_dir) -> dict:
    """The recorded engine calls again, one ``generate`` each, on a fresh engine."""
    from mllm_msr.engines.vllm import VLLMEngine

    engine = VLLMEngine(up.engine, cache_dir=cache_dir)
    generate = engine_generate(engine, up)
    for chats, keys in warm:
        generate(chats, keys)
    t0 = time.perf_counter()
    for chats, keys in calls:
        generate(chats, keys)
    seconds = time.perf_counter() - t0
    engine.close()
    return {
        "engine_calls": len(calls),
        "requests": sum(len(c) for c, _ in calls),
        "seconds": round(seconds, 2),
    }


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


def run_continuous(
    users: list[UserWork], engine, up: UserPreferencesConfig, per_batch: int
) -> tuple[dict, WavefrontStats]:
    """The stage's continuous feeding, batch after batch as the actor does."""
    total = WavefrontStats()
    chains: dict = {}
    t0 = time.perf_counter()
    for i in range(0, len(users), per_batch):
        c, s = continuous_wavefront(users[i : i + per_batch], engine_feeder(engine, up), up)
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
    # Ray starts workers at nice 15, which starves the actor against busy nice-0 processes
    # (this one's Ray Data driver included): the same priority as the in-process runs.
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
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
        up = dataclasses.replace(up, pool=dataclasses.replace(up.pool))
        cfg.user_preferences = up
        up.pool.batch_size = args.users_per_batch
        if args.stage_actors > 1:  # the users split across actors, the cores across engines
            up.pool.concurrency = args.stage_actors
            up.pool.batch_size = -(-len(users) // args.stage_actors)
            up.engine = dataclasses.replace(
                up.engine, cpu_threads=max(1, args.cpu_threads // args.stage_actors)
            )
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
        import resource

        t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        summary = run_user_preferences(cfg, run)
        seconds, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        # CPU this driver process spent (Ray Data's executor, planning, reading the output)
        driver_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        rerun = run_user_preferences(cfg, run)
        return {
            "users": summary["rows_out"],
            "blocks": summary["blocks"],
            "engine_calls": summary["engine_calls"],
            "seconds_with_ray_and_engine_start": round(seconds, 2),
            "users_per_s": round(summary["rows_out"] / seconds, 3),
            # wall time of the engine phase over all actors (the first wavefront's start to
            # the last one's end); wavefront_s sums the actors' times
            "active_s": summary["active_seconds"],
            "active_users_per_s": round(summary["rows_out"] / summary["active_seconds"], 3),
            "wavefront_s": summary["wavefront_seconds"],
            "engine_threads": summary["engine_threads"],
            "actors": args.stage_actors,
            "driver_cpu_s": round(driver_cpu, 2),
            "rerun_seconds": rerun["seconds"],
            "rerun_engine_calls": rerun["engine_calls"],
        }
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main(args: argparse.Namespace) -> dict:
    from mllm_msr.engines.vllm import VLLMEngine

    record = BenchRecord.start("user_preferences")
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    up = UserPreferencesConfig(
        engine=EngineConfig(
            model=args.model,
            family=args.family,
            dtype=args.dtype,
            max_num_seqs=args.users_per_batch,
            max_model_len=2048,
            # the same threads in this process and in the stage's actor (Ray gives an actor
            # OMP_NUM_THREADS = its num_cpus, 1 by default; a plain process every core)
            cpu_threads=args.cpu_threads,
        ),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0),
        block_size=args.block_size,
        feeding=args.feeding,
        max_in_flight=args.max_in_flight,
    )
    t0 = time.perf_counter()
    engine = VLLMEngine(up.engine, cache_dir=args.cache_dir)
    startup = time.perf_counter() - t0
    generate = engine_generate(engine, up)
    out: dict = {
        "workload": args.workload,
        "model": args.model,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "block_size": args.block_size,
        "history_items": [args.min_items, args.max_items],
        "users_per_batch": args.users_per_batch,
        "stage_feeding": args.feeding,
        "max_in_flight": args.max_in_flight,
        "engine_startup_s": round(startup, 2),
        "engine_cpu_threads": engine.cpu_threads,
        "command": " ".join(sys.argv),
        "runs": [],
    }
    # Warm-up (kernels, caches) outside the timings.
    warm = make_users(args.warm_users, args.min_items, args.max_items, args.catalog, seed=10_000)
    warm_calls: list = []
    run_wavefront(warm, recording(generate, warm_calls), up, args.users_per_batch)
    run_continuous(warm, engine, up, args.users_per_batch)

    largest = max(args.users)
    users_all = make_users(largest, args.min_items, args.max_items, args.catalog, args.seed)
    seq_users = users_all[: args.sequential_users]

    calls: list = []
    wf_chains: dict = {}
    for n in sorted(args.users):
        gen = recording(generate, calls) if n == min(args.users) else generate
        # Each timed pass starts without the previous pass's prompts in the prefix cache: the
        # continuous pass sends the very prompts of the rounds (a first version of this bench
        # let it hit them, ~1.5x too fast on SmolLM2).
        engine.reset_prefix_cache()
        chains, stats = run_wavefront(users_all[:n], gen, up, args.users_per_batch)
        out["runs"].append(report("wavefront", stats))
        print(json.dumps(out["runs"][-1]), flush=True)
        if n == min(args.users):
            wf_chains = chains
        engine.reset_prefix_cache()
        chains, stats = run_continuous(users_all[:n], engine, up, args.users_per_batch)
        out["runs"].append(report("continuous", stats))
        print(json.dumps(out["runs"][-1]), flush=True)
        if n == min(args.users):
            out["continuous_vs_wavefront_identical_users"] = (
                f"{sum(chains[u] == wf_chains[u] for u in wf_chains)}/{len(wf_chains)}"
            )

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
    same = sum(wf_chains[u] == seq_chains[u] for u in seq_chains)
    out["sequential_vs_wavefront_identical_users"] = f"{same}/{len(seq_chains)}"
    engine.close()
    out["raw"] = replay_raw(up, calls, warm_calls, args.cache_dir)
    print(json.dumps({"raw": out["raw"]}), flush=True)

    wf = [r for r in out["runs"] if r["mode"] == "wavefront"]
    cont = [r for r in out["runs"] if r["mode"] == "continuous"]
    seq_r = next(r for r in out["runs"] if r["mode"] == "sequential")
    raw_users_per_s = wf[0]["users"] / out["raw"]["seconds"]
    ratios = {
        "continuous_vs_sequential": round(cont[0]["users_per_s"] / seq_r["users_per_s"], 2),
        "continuous_vs_raw": round(out["raw"]["seconds"] / cont[0]["seconds"], 3),
        "wavefront_vs_sequential": round(wf[0]["users_per_s"] / seq_r["users_per_s"], 2),
        "wavefront_vs_raw": round(out["raw"]["seconds"] / wf[0]["seconds"], 3),
        # the ceiling: the bare engine's batched rounds over the per-user loop
        "raw_vs_sequential": round(raw_users_per_s / seq_r["users_per_s"], 2),
    }
    out["engine_calls_per_user"] = {
        "sequential": round(seq_r["engine_calls"] / seq_r["users"], 2),
        "wavefront": round(wf[0]["engine_calls"] / wf[0]["users"], 3),
        "continuous_engine_steps": round(cont[0]["engine_calls"] / cont[0]["users"], 3),
    }
    if len(cont) > 1:
        out["scaling"] = [
            {"users": r["users"], "seconds": r["seconds"], "users_per_s": r["users_per_s"]}
            for r in cont
        ]
    if args.stage_users:
        out["stage"] = run_stage(users_all[: args.stage_users], up, args)
        print(json.dumps(out["stage"]), flush=True)
        if args.stage_users == min(args.users):  # the same requests as the raw replay
            ratios["stage_vs_raw"] = round(out["raw"]["seconds"] / out["stage"]["active_s"], 3)
        ratios["stage_vs_sequential"] = round(
            out["stage"]["active_users_per_s"] / seq_r["users_per_s"], 2
        )
    out["ratios"] = record.gate_ratios(ratios, allow_load=args.allow_load)
    if out["ratios"] is None:
        print(f"ratios refused: {record.notes[-1]}", file=sys.stderr)
    if not args.no_record:
        out["record"] = str(record.write(out, tag=args.workload))
    text = json.dumps({"provenance": record.provenance(), **out, "notes": record.notes}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
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
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per workload")
    p.add_argument("--model", default=None, help="default: per workload")
    p.add_argument("--family", default=None, help="default: per workload")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--feeding",
        choices=["continuous", "rounds"],
        default="continuous",
        help="the stage's feeding (user_preferences.feeding)",
    )
    p.add_argument("--max-in-flight", type=int, default=0, help="user_preferences.max_in_flight")
    p.add_argument(
        "--warm-users",
        type=int,
        default=8,
        help="users of the untimed warm-up of each in-process engine (the stage has none)",
    )
    p.add_argument("--worker-niceness", type=int, default=0, help="nice value of Ray workers")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="engine.cpu_threads of every engine, the stage's included (default: every core)",
    )
    p.add_argument(
        "--stage-actors",
        type=int,
        default=1,
        help="actors of the stage (the users split evenly, --cpu-threads divided among them)",
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stage-users",
        type=int,
        default=0,
        help="also time the whole stage (embedded Ray, actor, part files) on this many users",
    )
    add_arguments(p)  # --out, --no-record, --allow-load
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())
