"""Demo adapter: the generated catalog of :mod:`mllm_msr.data.demo`, streamed through Ray Data.

Items and users are generated inside map tasks from ``ray.data.range`` blocks (a pure function of
seed and index), so memory stays bounded by one block whatever the number of users.
"""

from __future__ import annotations

import math

import pyarrow as pa

from mllm_msr.config import IngestConfig
from mllm_msr.data import demo
from mllm_msr.data.images import ImageError, image_set_hash, normalize_image
from mllm_msr.data.ingest.common import INTERACTION_ROWS, ITEM_ROWS, qsource, reject, rows_table
from mllm_msr.data.ingest.sources import Sources


class DemoItems:
    """``map_batches`` over ``range`` ids: drawn items with normalized images."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        raw = demo.items_table(batch["id"].to_numpy(), self.cfg.demo_seed)
        rows = []
        for r in raw.to_pylist():
            row = {
                "item_id": r["item_id"],
                "title": r["title"],
                "text": r["text"],
                "q_source": qsource("items", "demo"),
                "q_key": r["item_id"],
            }
            try:
                img = normalize_image(r["image_png"], self.cfg.images)
            except ImageError as exc:  # not expected: drawn images are valid
                rows.append(reject(row, exc.reason, exc.detail))
                continue
            rows.append(
                {
                    **row,
                    "images": [img.data],
                    "image_hashes": [img.sha256],
                    "image_hash": image_set_hash([img.sha256]),
                }
            )
        return rows_table(rows, ITEM_ROWS)


def demo_interactions(batch: pa.Table, seed: int, n_items: int) -> pa.Table:
    t = demo.interactions_table(batch["id"].to_numpy(), seed, n_items)
    nulls = pa.nulls(t.num_rows, pa.string())
    return pa.table([*t.columns, nulls, nulls, nulls, nulls], schema=INTERACTION_ROWS)


def demo_sources(cfg: IngestConfig) -> Sources:
    import ray.data

    item_blocks = max(cfg.num_shards, math.ceil(cfg.demo_items / 500))
    user_blocks = max(cfg.num_shards, math.ceil(cfg.demo_users / cfg.demo_block_users))
    items = ray.data.range(cfg.demo_items, override_num_blocks=item_blocks).map_batches(
        DemoItems(cfg), batch_format="pyarrow", batch_size=256
    )
    inter = ray.data.range(cfg.demo_users, override_num_blocks=user_blocks).map_batches(
        demo_interactions,
        fn_kwargs={"seed": cfg.demo_seed, "n_items": cfg.demo_items},
        batch_format="pyarrow",
        batch_size=cfg.demo_block_users,
    )
    return Sources(items, inter, None, "demo", "demo", "demo", final=True)
