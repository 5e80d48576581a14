"""Prepare stage: ``interactions/`` -> ``sequences/``, ``candidates/``, ``quarantine/prepare/``.

1. interactions whose item is not in ``items/`` are quarantined (``unknown_item``);
2. the (user, item) k-core filter runs in memory (see :mod:`mllm_msr.data.prepare` for scale);
   what it removes is reported as protocol filtering, not as quarantine;
3. users are split (seeded) and their examples built in ``cfg.prepare.num_blocks`` Ray Data
   blocks; the outputs do not depend on the number of blocks.

Idempotent like every stage: a completed stage is skipped, a partial one is cleared and rerun.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_msr.config import PipelineConfig
from mllm_msr.data import schema
from mllm_msr.data.prepare import (
    build_examples,
    candidates_of,
    kcore,
    sample_split_users,
    sequences_of,
    user_sequences,
    with_splits,
)
from mllm_msr.runtime import RunDir, init_ray

STAGE = "prepare"
OUTPUTS = ("sequences", "candidates", f"quarantine/{STAGE}")


def _examples_sink_cls():
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class ExamplesSink(Datasink):
        """Writes ``EXAMPLES`` blocks as ``sequences/`` and exploded ``candidates/``."""

        def __init__(self, run_uri: str) -> None:
            self.run_uri = run_uri
            self.result: dict = {}

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict:
            run = RunDir(self.run_uri)
            counts: Counter = Counter()
            for j, block in enumerate(blocks):
                ex = BlockAccessor.for_block(block).to_arrow()
                if ex.num_rows == 0:
                    continue
                name = f"part-{ctx.task_idx:05d}-{j:04d}"
                run.write_table("sequences", sequences_of(ex).cast(schema.SEQUENCES), name)
                cand = candidates_of(ex).cast(schema.CANDIDATES)
                run.write_table("candidates", cand, name)
                counts.update(f"{s}|sequences" for s in ex["split"].to_pylist())
                counts.update(f"{s}|candidates" for s in cand["split"].to_pylist())
            return dict(counts)

        def on_write_complete(self, write_result: Any) -> None:
            total: Counter = Counter()
            for r in write_result.write_returns:
                total.update(r or {})
            self.result = dict(total)

    return ExamplesSink


def _build(batch: pa.Table, pool: np.ndarray, cfg: Any) -> pa.Table:
    return build_examples(batch, pool, cfg)


def quarantine_unknown(run: RunDir, interactions: pa.Table, known: pa.Array) -> int:
    bad = interactions.filter(pc.invert(known))
    if bad.num_rows:
        keys = pc.binary_join_element_wise(bad["user_id"], bad["item_id"], "|")
        q = pa.table(
            {
                "stage": pa.array([STAGE] * bad.num_rows, pa.string()),
                "source": pa.array(["interactions"] * bad.num_rows, pa.string()),
                "key": keys,
                "reason": pa.array(["unknown_item"] * bad.num_rows, pa.string()),
                "detail": pc.binary_join_element_wise(
                    pa.scalar("item not in items/: "), bad["item_id"], ""
                ),
            },
            schema=schema.QUARANTINE,
        )
        run.write_table(f"quarantine/{STAGE}", q, "unknown_item")
    return bad.num_rows


def run_prepare(cfg: PipelineConfig, run: RunDir, log=print) -> dict:
    """Run the prepare stage (the pipeline decides when); returns its summary."""
    import ray.data

    init_ray(
        cfg.ray.address,
        cfg.ray.num_cpus,
        cfg.ray.object_store_memory,
        hf_hub_offline=cfg.hf_hub_offline,
    )
    for table in OUTPUTS:
        run.remove(table)
    t0 = time.perf_counter()
    pcfg = cfg.prepare
    inter = run.read_table("interactions", columns=schema.INTERACTIONS.names)
    item_ids = run.read_table("items", columns=["item_id"])["item_id"]
    known = pc.is_in(inter["item_id"], value_set=item_ids.combine_chunks())
    n_unknown = quarantine_unknown(run, inter, known)
    inter = inter.filter(known)

    kc = kcore(inter["user_id"], inter["item_id"], pcfg.user_core, pcfg.item_core)
    core = inter.filter(pa.array(kc.mask))
    seqs = with_splits(user_sequences(core), pcfg)
    split_users = Counter(seqs["split"].to_pylist())
    seqs = sample_split_users(seqs, pcfg.max_users, pcfg.seed)
    check_not_empty(seqs, kc, inter.num_rows, pcfg)
    pool = np.array(sorted(pc.unique(core["item_id"]).to_pylist()), dtype=str)
    n_blocks = max(1, min(pcfg.num_blocks, seqs.num_rows))
    bounds = np.linspace(0, seqs.num_rows, n_blocks + 1).astype(int)
    ds = ray.data.from_arrow([seqs.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    ds = ds.map_batches(
        _build, fn_kwargs={"pool": pool, "cfg": pcfg}, batch_format="pyarrow", batch_size=None
    )
    sink = _examples_sink_cls()(run.uri)
    ds.write_datasink(sink)

    splits = {
        s: {
            "users": sink.result.get(f"{s}|sequences", 0),
            "candidates": sink.result.get(f"{s}|candidates", 0),
        }
        for s in ("train", "val", "test")
    }
    summary = {
        "rows_in": inter.num_rows + n_unknown,
        "rows_out": core.num_rows,
        "quarantined": n_unknown,
        "quarantined_by_reason": {"unknown_item": n_unknown} if n_unknown else {},
        "kcore": {
            "user_core": pcfg.user_core,
            "item_core": pcfg.item_core,
            "rounds": kc.rounds,
            "interactions_filtered": int(inter.num_rows - core.num_rows),
            "users_before": kc.users_before,
            "items_before": kc.items_before,
            "users_filtered": kc.users_before - kc.users_after,
            "items_filtered": kc.items_before - kc.items_after,
        },
        "users": kc.users_after,
        "items": kc.items_after,
        "interactions": core.num_rows,
        "split": pcfg.split,
        "splits": splits,
        "max_users": dict(pcfg.max_users),
        "split_users_before_sampling": dict(split_users),
        "seed": pcfg.seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(format_summary(summary))
    return summary


def check_not_empty(seqs: pa.Table, kc: Any, n_interactions: int, pcfg: Any) -> None:
    """Raise when the protocol filters leave no user, naming the settings that emptied it."""
    if kc.users_after == 0:
        raise ValueError(
            f"prepare: the ({pcfg.user_core}, {pcfg.item_core})-core leaves 0 users "
            f"({kc.users_before} users, {kc.items_before} items, {n_interactions} known "
            f"interactions before it): lower prepare.user_core / prepare.item_core or ingest "
            f"more interactions"
        )
    if seqs.num_rows == 0:
        raise ValueError(
            f"prepare: prepare.max_users={pcfg.max_users} keeps 0 of {kc.users_after} users"
        )


def format_summary(s: dict) -> str:
    k = s["kcore"]
    lines = [
        f"[prepare] in {s['seconds']:.1f} s: interactions read {s['rows_in']}, "
        f"quarantined {s['quarantined']} {s['quarantined_by_reason'] or ''}, "
        f"({k['user_core']},{k['item_core']})-core filtered {k['interactions_filtered']} "
        f"({k['users_filtered']} users, {k['items_filtered']} items, {k['rounds']} rounds)",
        f"[prepare]   after k-core: users {s['users']}  items {s['items']}  interactions {s['interactions']}",
    ]
    for name, c in s["splits"].items():
        lines.append(
            f"[prepare]   {name:<5} users {c['users']:>7}  candidates {c['candidates']:>8}"
        )
    return "\n".join(lines)
