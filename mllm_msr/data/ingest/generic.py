"""Generic adapter: a user's own catalog as CSV or Parquet files.

- interactions (``cfg.interactions``): columns user / item / timestamp (names from
  ``cfg.user_column``, ``cfg.item_column``, ``cfg.timestamp_column``; defaults ``user_id``,
  ``item_id``, ``timestamp``), timestamps in ``cfg.timestamp_unit``;
- items (``cfg.items``): item id, ``title`` and optional ``text`` columns, and images from one of
  ``cfg.image_url_column`` (URLs), ``cfg.image_column`` (paths relative to ``cfg.image_dir`` or
  ``cfg.root``; several separated by ``|`` or a list column) or ``cfg.image_dir`` alone (files
  named ``<item_id>.<ext>``).
"""

from __future__ import annotations

import pyarrow as pa

from mllm_msr.config import IngestConfig
from mllm_msr.data.ingest import files
from mllm_msr.data.ingest.common import (
    RAW_ITEM_ROWS,
    item_row,
    pick_column,
    qsource,
    read_table_file,
    reader_reject,
    resolve,
    rows_table,
)
from mllm_msr.data.ingest.microlens import CsvInteractions, MicroLensItems
from mllm_msr.data.ingest.sources import Sources


def split_refs(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    return [v.strip() for v in str(value).split("|") if v.strip()]


class GenericItems:
    """``map_batches``: item rows -> raw item rows (image references from a column)."""

    def __init__(
        self,
        cfg: IngestConfig,
        item: str,
        title: str,
        text: str | None,
        image: str | None,
        source: str,
    ) -> None:
        self.cfg, self.item, self.title, self.text, self.image = cfg, item, title, text, image
        self.source = source

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            bad = reader_reject(r, self.source)
            if bad is not None:
                rows.append(bad)
                continue
            refs = split_refs(r.get(self.image)) if self.image else []
            text = r.get(self.text) if self.text else ""
            rows.append(
                item_row(r.get(self.item), r.get(self.title), text, refs, self.source, self.cfg)
            )
        return rows_table(rows, RAW_ITEM_ROWS)


def generic_sources(cfg: IngestConfig) -> Sources:
    if not cfg.interactions or not cfg.items:
        raise ValueError("format=generic needs ingest.interactions and ingest.items")
    if cfg.root:
        files.check_root(cfg.root, "generic")
    inter = resolve(cfg.root, cfg.interactions)
    items = resolve(cfg.root, cfg.items)
    n = cfg.num_shards
    raw, names = read_table_file(inter, n)
    user = pick_column(names, cfg.user_column, ("user_id", "user"), "user", inter)
    item = pick_column(names, cfg.item_column, ("item_id", "item"), "item", inter)
    ts = pick_column(names, cfg.timestamp_column, ("timestamp", "time", "ts"), "timestamp", inter)
    scale = 1000 if cfg.timestamp_unit == "ms" else 1
    inter_ds = raw.map_batches(
        CsvInteractions(user, item, ts, qsource("interactions", inter), scale),
        batch_format="pyarrow",
    )

    raw_items, names = read_table_file(items, n)
    item_col = pick_column(names, cfg.item_column, ("item_id", "item"), "item", items)
    title_col = pick_column(names, cfg.title_column, ("title",), "title", items)
    text_col = pick_column(
        names, cfg.text_column, ("text", "description"), "text", items, required=False
    )
    image_dir = resolve(cfg.root, cfg.image_dir) if cfg.image_dir else None
    source = qsource("items", items)
    if cfg.image_url_column or cfg.image_column:
        image_col = pick_column(names, cfg.image_url_column or cfg.image_column, (), "image", items)
        items_ds = raw_items.map_batches(
            GenericItems(cfg, item_col, title_col, text_col, image_col, source),
            batch_format="pyarrow",
        )
        image_root = image_dir or cfg.root
    else:
        items_ds = raw_items.map_batches(
            MicroLensItems(cfg, item_col, title_col, image_dir, source, text_col),
            batch_format="pyarrow",
        )
        image_root = image_dir
    return Sources(
        items_ds, inter_ds, image_root, cfg.image_dir or cfg.image_column or "", items, inter
    )
