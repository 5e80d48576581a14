"""Ingest stage: a raw dataset -> ``items/``, ``interactions/``, ``quarantine/ingest/``.

Streaming Ray Data pipeline (see :mod:`mllm_msr.data.ingest.common`). Idempotent: a completed
stage (marker present) is not rerun; an unfinished one first deletes its partial outputs, so a
rerun after a crash never duplicates rows.
"""

from __future__ import annotations

import dataclasses
import os
import time

from mllm_msr.config import PipelineConfig
from mllm_msr.data import schema
from mllm_msr.data.ingest import adapter, files
from mllm_msr.data.ingest.common import (
    ImageLoader,
    dedupe,
    dedupe_interactions,
    dedupe_items,
    write_routed,
)
from mllm_msr.runtime import RunDir, init_ray

STAGE = "ingest"
OUTPUTS = ("items", "interactions", f"quarantine/{STAGE}")


def _counts(kind: str, written: int, quarantined: dict[str, int]) -> dict:
    by_reason = {
        k.split("|", 1)[1]: v for k, v in sorted(quarantined.items()) if k.split("|", 1)[0] == kind
    }
    q = sum(by_reason.values())
    return {
        "read": written + q,
        "written": written,
        "quarantined": q,
        "quarantined_by_reason": by_reason,
    }


def format_summary(s: dict) -> str:
    lines = [f"[ingest] format={s['format']} in {s['seconds']:.1f} s"]
    for kind in ("items", "images", "interactions"):
        c = s[kind]
        lines.append(
            f"[ingest]   {kind:<13} read {c['read']:>9}  written {c['written']:>9}  "
            f"quarantined {c['quarantined']:>7} {c['quarantined_by_reason'] or ''}"
        )
    return "\n".join(lines)


def run_ingest(cfg: PipelineConfig, run: RunDir, log=print) -> dict:
    """Run the ingest stage (the pipeline decides when); returns its summary."""
    init_ray(
        cfg.ray.address,
        cfg.ray.num_cpus,
        cfg.ray.object_store_memory,
        hf_hub_offline=cfg.hf_hub_offline,
    )
    for table in OUTPUTS:  # partial outputs of a crashed run
        run.remove(table)
    t0 = time.perf_counter()
    icfg = cfg.ingest
    if icfg.root and "://" not in icfg.root:  # workers may not share the driver's cwd
        icfg = dataclasses.replace(icfg, root=os.path.abspath(icfg.root))
    src = adapter(icfg.format)(icfg)
    items, interactions = src.items, src.interactions
    if src.image_root and not files.is_dir(src.image_root):
        log(f"[ingest] warning: image folder {src.image_root} does not exist: items are text-only")
    if not src.final:
        parts = max(1, icfg.num_shards)
        items = dedupe(items, "item_id", dedupe_items, parts)
        items = items.map_batches(
            ImageLoader(icfg, src.image_root, src.image_source),
            batch_format="pyarrow",
            batch_size=64,
        )
        interactions = dedupe(interactions, "user_id", dedupe_interactions, parts)
    it = write_routed(items, run, "items", schema.ITEMS)
    ia = write_routed(interactions, run, "interactions", schema.INTERACTIONS)
    quarantined = {**it["quarantined"], **ia["quarantined"]}
    summary = {
        "format": icfg.format,
        "items_file": src.items_file,
        "interactions_file": src.interactions_file,
        "items": _counts("items", it["written"], quarantined),
        "images": _counts("images", it["images"], quarantined),
        "interactions": _counts("interactions", ia["written"], quarantined),
    }
    summary["rows_in"] = summary["items"]["read"] + summary["interactions"]["read"]
    summary["rows_out"] = it["written"] + ia["written"]
    summary["quarantined"] = (
        summary["items"]["quarantined"] + summary["interactions"]["quarantined"]
    )
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log(format_summary(summary))
    empty = [k for k in ("items", "interactions") if summary[k]["written"] == 0]
    if empty:
        raise ValueError(
            f"ingest wrote no {' and no '.join(empty)} (format={icfg.format}, "
            f"items file {src.items_file}, interactions file {src.interactions_file}; "
            f"quarantined: {quarantined or 'none'}): check ingest.root, ingest.items, "
            f"ingest.interactions and the column settings"
        )
    return summary
