"""Benchmark of the item-summaries stage on the tiny Qwen2-VL (same images, same max new tokens).

Figures, measured in one run on the same drawn catalog (one image per item, greedy decoding):

* ``hf_baseline``: the reference code's way: one process, Hugging Face ``generate``, batches of
  ``--hf-batch`` images padded to the batch's longest prompt (``--hf-dtype``, float32 by default:
  the faster of the two on CPU);
* ``vllm_raw``: the vLLM engine in this process, every prompt in one ``generate`` call, engine
  start excluded (best of ``--repeat`` passes); plus ``interleaved``: the actor's per-batch work
  (rows -> prompts -> engine -> Parquet) against the bare engine call, alternating batch by
  batch so that both see the same machine load;
* ``stage``: :func:`mllm_msr.stages.item_summaries.run_item_summaries` on a local Ray cluster,
  once per ``--actors`` entry (``N`` actors, or ``NxC``: N actors with C CPUs each, C defaulting
  to ``--cpus / N``). Reported per run: items/s over the whole work phase (engine start-up
  included) and "active" items/s, from the first batch's start to the last batch's end.

The baselines run on the first ``--baseline-items`` items (HF on ``--hf-items``), the stage on
all ``--items`` (enough work that the actors' start-up skew does not decide the result).

Ratios: stage (1 actor, active) / hf_baseline (target >= 5x) and stage / vllm_raw (target
>= 0.7). Prints a JSON report (and writes it with ``--out``).

Threads and priority: ``OMP_NUM_THREADS`` defaults to ``--omp-threads`` (1) for this process and
the actors. On the shared, oversubscribed 2-core machine this mattered more than anything else:
the raw engine gave ~26 items/s with 2 OpenMP threads and ~540 items/s with 1. Ray runs its
workers at nice 15, which starves them against busy nice-0 processes of other users; the bench
starts its Ray with ``--worker-niceness`` (0) so the stage and the baselines compete alike.

    .venv/bin/python bench/item_summaries.py --items 4000 --actors 1x1 2x1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from mllm_msr import prompts  # noqa: E402
from mllm_msr.config import (  # noqa: E402
    ImageConfig,
    ItemSummariesConfig,
    PipelineConfig,
    load_config,
)
from mllm_msr.data import demo, schema  # noqa: E402
from mllm_msr.data.images import image_set_hash, normalize_image  # noqa: E402
from mllm_msr.runtime import RunDir, cpu_env_defaults  # noqa: E402
from mllm_msr.stages import item_summaries as stage  # noqa: E402


def make_items(n: int, side: int, seed: int = 0) -> pa.Table:
    """``n`` demo items with one drawn cover each, normalized like ingest does."""
    rows = []
    for i in range(n):
        img = normalize_image(demo.draw_item_image(i, seed, side=side), ImageConfig(max_side=side))
        rows.append(
            {
                "item_id": demo.item_id(i),
                "title": demo.item_title(i, seed),
                "text": demo.item_text(i),
                "images": [img.data],
                "image_hashes": [img.sha256],
                "image_hash": image_set_hash([img.sha256]),
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.ITEMS)


def item_chats(items: pa.Table) -> list[prompts.Chat]:
    """The stage's prompts for single-image items (decoded PIL image + title)."""
    return [
        prompts.item_summary_messages(stage.decode_image(r["images"][0]), r["title"])
        for r in items.select(["title", "images"]).to_pylist()
    ]


def bench_vllm_raw(
    cfg: PipelineConfig, items: pa.Table, chats: list[prompts.Chat], repeat: int
) -> dict:
    from mllm_msr.engines.vllm import VLLMEngine

    s = cfg.item_summaries
    t0 = time.perf_counter()
    engine = VLLMEngine(s.engine, Path(cfg.cache_dir).absolute())
    start = time.perf_counter() - t0
    engine.generate(chats[:2], s.sampling)  # warm-up
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = engine.generate(chats, s.sampling)
        rates.append(len(chats) / (time.perf_counter() - t0))
    interleaved = bench_batch_path(engine, s, items)
    engine.close()
    return {
        "engine_start_s": round(start, 2),
        "items_per_s": round(max(rates), 2),
        "items_per_s_each": [round(r, 2) for r in rates],
        "output_tokens": sum(g.output_tokens for g in out),
        "interleaved": interleaved,
    }


def bench_batch_path(engine, s: ItemSummariesConfig, items: pa.Table) -> dict:
    """The actor's per-batch work vs the bare engine call, interleaved batch by batch.

    Per batch of ``pool.batch_size`` items, alternately: (1) decode the images, build the
    prompts, ``engine.generate``; (2) the actor's path: Arrow rows -> keys ->
    :func:`~mllm_msr.stages.item_summaries.summarize_items` -> Parquet file. Interleaving
    exposes both to the same machine load, which swings a lot on a shared host.
    """
    size = s.pool.batch_size
    engine_s = stage_s = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        run = RunDir(tmp)
        for start in range(0, items.num_rows - size + 1, size):
            part = items.slice(start, size)
            t0 = time.perf_counter()
            engine.generate(item_chats(part), s.sampling)
            engine_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = part.select(stage.INPUT_COLUMNS).to_pylist()
            keys = [stage.item_key(r["item_id"], r["image_hash"], 1, s) for r in rows]
            result = stage.summarize_items(rows, lambda c: engine.generate(c, s.sampling), s)
            stage.write_batch(run, stage.part_name(keys), result)
            stage_s += time.perf_counter() - t0
    n = (items.num_rows // size) * size
    return {
        "items": n,
        "engine_items_per_s": round(n / engine_s, 2),
        "batch_path_items_per_s": round(n / stage_s, 2),
        "ratio": round(engine_s / stage_s, 3),
    }


def bench_hf(
    cfg: PipelineConfig, chats: list[prompts.Chat], batch: int, dtype: str, repeat: int
) -> dict:
    """One process, ``generate`` on padded batches (as the reference implementation does)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm_msr.tiny import resolve_model

    s = cfg.item_summaries
    path = resolve_model(s.engine.model, Path(cfg.cache_dir).absolute())
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    kwargs = {}
    if s.engine.image_max_pixels:
        kwargs["images_kwargs"] = {"max_pixels": s.engine.image_max_pixels}
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tokens = _hf_pass(
            processor, model, chats, batch, s.sampling.max_new_tokens, kwargs, eos_ids
        )
        rates.append(len(chats) / (time.perf_counter() - t0))
    return {
        "batch": batch,
        "dtype": dtype,
        "items_per_s": round(max(rates), 2),
        "items_per_s_each": [round(r, 2) for r in rates],
        "output_tokens": tokens,
    }


def _hf_pass(processor, model, chats, batch, max_new_tokens, kwargs, eos_ids) -> int:
    """One pass over ``chats`` in padded batches; returns the tokens generated before EOS."""
    import torch

    tokens = 0
    for start in range(0, len(chats), batch):
        part = chats[start : start + batch]
        texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in part]
        images = [prompts.chat_images(c)[0] for c in part]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        tokens += sum(
            next((k for k, t in enumerate(row.tolist()) if t in eos_ids), len(row)) for row in new
        )
    return tokens


def bench_stage(base: PipelineConfig, items: pa.Table, actors: int, cpus: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-is-") as tmp:
        run = RunDir(tmp)
        step = -(-items.num_rows // 4)
        for k in range(4):
            run.write_table("items", items.slice(k * step, step), name=f"part-{k:05d}")
        s = base.item_summaries
        pool = dataclasses.replace(s.pool, concurrency=actors, num_cpus=cpus)
        cfg = dataclasses.replace(
            base, run_dir=tmp, item_summaries=dataclasses.replace(s, pool=pool)
        )
        t0 = time.perf_counter()
        summary = stage.run_item_summaries(cfg, run, log=lambda *_: None)
        wall = time.perf_counter() - t0
    return {
        "actors": actors,
        "cpus_per_actor": cpus,
        "rows_out": summary["rows_out"],
        "wall_s": round(wall, 2),
        "items_per_s": round(items.num_rows / summary["work_seconds"], 2),
        "active_s": summary["active_seconds"],
        "active_items_per_s": summary["active_items_per_s"],
    }


def parse_actors(spec: str, total_cpus: int) -> tuple[int, float]:
    n, _, c = spec.partition("x")
    return int(n), float(c) if c else total_cpus / int(n)


def main(args: argparse.Namespace) -> dict:
    base_cfg = load_config(
        args.config,
        [
            f"cache_dir={Path(args.cache_dir).absolute()}",
            f"item_summaries.sampling.max_new_tokens={args.max_new_tokens}",
            f"item_summaries.pool.batch_size={args.batch_size}",
            "item_summaries.sampling.temperature=0.0",
            *args.overrides,
        ],
    )
    for key, value in cpu_env_defaults().items():
        os.environ.setdefault(key, value)
    items = make_items(args.items, args.image_side)
    chats = item_chats(items.slice(0, args.baseline_items))  # the stage's prompts
    report: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "model": base_cfg.item_summaries.engine.model,
        "items": args.items,
        "baseline_items": min(args.items, args.baseline_items),
        "hf_items": min(args.items, args.baseline_items, args.hf_items),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "worker_niceness": args.worker_niceness,
        "image_side": args.image_side,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    baseline_items = items.slice(0, args.baseline_items)
    report["vllm_raw"] = bench_vllm_raw(base_cfg, baseline_items, chats, args.repeat)
    print(json.dumps({"vllm_raw": report["vllm_raw"]}), flush=True)
    if not args.skip_hf:
        hf_chats = chats[: args.hf_items]
        report["hf_baseline"] = bench_hf(
            base_cfg, hf_chats, args.hf_batch, args.hf_dtype, args.repeat
        )
        print(json.dumps({"hf_baseline": report["hf_baseline"]}), flush=True)

    import ray

    # Ray starts workers at nice 15; on a host shared with other busy processes that alone
    # starves the actors against this nice-0 process. Same priority for a fair comparison.
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    temp = tempfile.mkdtemp(prefix="ray-bis-")
    ray.init(
        num_cpus=args.ray_cpus,
        object_store_memory=500_000_000,
        include_dashboard=False,
        _temp_dir=temp,
        runtime_env={
            "env_vars": {
                **{k: os.environ[k] for k in cpu_env_defaults()},
                "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            }
        },
    )
    try:
        report["stage"] = []
        for spec in args.actors:
            n, c = parse_actors(spec, args.cpus)
            result = bench_stage(base_cfg, items, n, c)
            report["stage"].append(result)
            print(json.dumps({"stage": result}), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    one = next((r for r in report["stage"] if r["actors"] == 1), None)
    two = next((r for r in report["stage"] if r["actors"] == 2), None)
    ratios = {}
    if one:
        ratios["batch_path_vs_engine_interleaved"] = report["vllm_raw"]["interleaved"]["ratio"]
        ratios["stage_1actor_vs_vllm_raw"] = round(
            one["active_items_per_s"] / report["vllm_raw"]["items_per_s"], 3
        )
        if "hf_baseline" in report:
            ratios["stage_1actor_vs_hf"] = round(
                one["active_items_per_s"] / report["hf_baseline"]["items_per_s"], 2
            )
    if one and two:
        ratios["2_vs_1_actors_active"] = round(
            two["active_items_per_s"] / one["active_items_per_s"], 3
        )
        ratios["2_vs_1_actors_wall"] = round(two["items_per_s"] / one["items_per_s"], 3)
    report["ratios"] = ratios
    report["load_after"] = round(os.getloadavg()[0], 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--cache-dir", default=os.environ.get("MLLM_MSR_CACHE", ".cache/mllm_msr"))
    p.add_argument("--items", type=int, default=4000, help="items of the stage runs")
    p.add_argument("--baseline-items", type=int, default=512, help="items of the raw engine")
    p.add_argument("--hf-items", type=int, default=64, help="items of the HF baseline")
    p.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS unless set")
    p.add_argument("--image-side", type=int, default=224)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64, help="stage batch size")
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="baseline passes (best one reported)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs shared by the stage's actors")
    p.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs of the local Ray")
    p.add_argument("--actors", nargs="+", default=["1x1", "2x1"], help="N or NxCPUS per run")
    p.add_argument("--worker-niceness", type=int, default=0, help="nice value of Ray workers")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(arguments.omp_threads))  # before torch loads
    main(arguments)
