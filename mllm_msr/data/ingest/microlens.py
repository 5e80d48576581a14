"""MicroLens adapter (Ni et al., 2023; the layout the MLLM-MSR paper uses).

Files under ``cfg.root``:

- interactions: ``*pairs.tsv`` -- one line per user, ``user<TAB>item item ...`` in chronological
  order (no timestamps: an interaction's timestamp is its position in the line), or a CSV with
  ``user,item,timestamp`` columns;
- items: a titles CSV (``item,title``);
- optional covers: ``cfg.image_dir`` with one image per item named ``<item_id>.<ext>``. Items
  without a cover are text-only (quarantined only when ``cfg.require_images``).

Files not named in the config are found by name (``*pairs.tsv`` / ``*pairs.csv``, ``*titles.csv``).
"""

from __future__ import annotations

import pyarrow as pa

from mllm_msr.config import IngestConfig
from mllm_msr.data.images import ImageError, relative_key, safe_join
from mllm_msr.data.ingest import files
from mllm_msr.data.ingest.common import (
    INTERACTION_ROWS,
    RAW_ITEM_ROWS,
    interaction_row,
    item_row,
    line_key,
    pick_column,
    qsource,
    read_table_file,
    reader_reject,
    reject,
    resolve,
    rows_table,
)
from mllm_msr.data.ingest.readers import DETAIL, ERROR, LINE, read_lines
from mllm_msr.data.ingest.sources import Sources


def _find(root: str, patterns: tuple[str, ...], what: str) -> str:
    for pattern in patterns:
        hits = files.glob(root, pattern)
        if hits:
            return hits[0]
    raise FileNotFoundError(f"microlens: no {what} file matching {patterns} under {root}")


def parse_pairs_lines(batch: pa.Table, source: str) -> pa.Table:
    """``user<TAB>item item ...`` lines -> interaction rows (timestamp = position).

    ``batch`` holds the lines (``text``) and, from :func:`.readers.read_lines`, their line
    numbers and decoding errors; a bad line is one rejected row keyed ``<file>:<line>``.
    """
    rows: list[dict] = []
    for rec in batch.to_pylist():
        bad = reader_reject(rec, source)
        if bad is not None:
            rows.append(bad)
            continue
        line = rec["text"]
        user, sep, items = line.rstrip("\r\n").partition("\t")
        user = user.strip()
        if not sep or not user or not items.strip():
            rows.append(
                reject(
                    {"user_id": user, "q_source": source},
                    "malformed_line",
                    f"expected user<TAB>items: {line[:200]!r}",
                    key=line_key(source, rec.get(LINE)),
                )
            )
            continue
        for pos, item in enumerate(items.split()):
            rows.append(interaction_row(user, item, pos, source, key=f"{user}@{pos}"))
    return rows_table(rows, INTERACTION_ROWS)


class CsvInteractions:
    """``map_batches``: CSV rows (strings) -> interaction rows."""

    def __init__(self, user: str, item: str, ts: str, source: str, scale: int = 1) -> None:
        self.user, self.item, self.ts, self.source, self.scale = user, item, ts, source, scale

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        cols = [self.user, self.item, self.ts]
        cols += [c for c in (LINE, ERROR, DETAIL) if c in batch.column_names]
        for r in batch.select(cols).to_pylist():
            bad = reader_reject(r, self.source)
            if bad is not None:
                rows.append(bad)
                continue
            line = r.get(LINE)  # None for Parquet inputs
            key = f"{r[self.user]}|{r[self.item]}" if line is None else line_key(self.source, line)
            row = interaction_row(r[self.user], r[self.item], r[self.ts], self.source, key=key)
            if row["q_reason"] is None and self.scale != 1:
                row["timestamp"] //= self.scale
            rows.append(row)
        return rows_table(rows, INTERACTION_ROWS)


class MicroLensItems:
    """``map_batches``: titles CSV rows -> raw item rows with the cover found by item id."""

    def __init__(
        self,
        cfg: IngestConfig,
        item: str,
        title: str,
        image_root: str | None,
        source: str,
        text: str | None = None,
    ) -> None:
        self.cfg, self.item, self.title, self.text = cfg, item, title, text
        self.image_root, self.source = image_root, source
        self._remote_names: set[str] | None = None

    def _remote_cover(self, item_id: str) -> list[str]:
        """The cover of ``item_id`` in a folder on object storage, listed once (not one request
        per item and extension)."""
        if self._remote_names is None:
            root = self.image_root.rstrip("/") + "/"
            names = files.list_files(self.image_root, recursive=True)
            self._remote_names = {n[len(root) :] for n in names if n.startswith(root)}
        for ext in self.cfg.image_extensions:
            name = item_id + ext
            try:
                key = relative_key(name)
            except ImageError:
                return [name]  # refused again (path_escape ...) and quarantined by the loader
            if key in self._remote_names:
                return [name]
        return []

    def _cover(self, item_id: str) -> list[str]:
        if self.image_root is None or not item_id:
            return []
        if files.is_remote(self.image_root):
            return self._remote_cover(item_id)
        for ext in self.cfg.image_extensions:
            name = item_id + ext
            try:
                if safe_join(self.image_root, name).is_file():
                    return [name]
            except (ImageError, OSError):
                return [name]  # refused again (path_escape ...) and quarantined by the loader
        return []

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            bad = reader_reject(r, self.source)
            if bad is not None:
                rows.append(bad)
                continue
            iid = (r[self.item] or "").strip()
            text = r.get(self.text) if self.text else ""
            rows.append(item_row(iid, r[self.title], text, self._cover(iid), self.source, self.cfg))
        return rows_table(rows, RAW_ITEM_ROWS)


def microlens_sources(cfg: IngestConfig) -> Sources:
    if not cfg.root:
        raise ValueError("ingest.root is required for format=microlens")
    root = cfg.root
    files.check_root(root, "microlens")
    inter = (
        resolve(root, cfg.interactions)
        if cfg.interactions
        else _find(root, ("*pairs.tsv", "*pairs.csv", "interactions.csv"), "interactions")
    )
    items = resolve(root, cfg.items) if cfg.items else _find(root, ("*titles.csv",), "titles")
    image_root = resolve(root, cfg.image_dir) if cfg.image_dir else None
    n = cfg.num_shards
    i_src = qsource("interactions", inter)
    if inter.endswith(".tsv"):
        inter_ds = read_lines(inter, n).map_batches(
            parse_pairs_lines, fn_kwargs={"source": i_src}, batch_format="pyarrow"
        )
    else:
        raw, names = read_table_file(inter, n)
        user = pick_column(names, cfg.user_column, ("user", "user_id"), "user", inter)
        item = pick_column(names, cfg.item_column, ("item", "item_id"), "item", inter)
        ts = pick_column(names, cfg.timestamp_column, ("timestamp", "time", "ts"), "time", inter)
        inter_ds = raw.map_batches(CsvInteractions(user, item, ts, i_src), batch_format="pyarrow")
    raw_items, names = read_table_file(items, n)
    item_col = pick_column(names, cfg.item_column, ("item", "item_id"), "item", items)
    title_col = pick_column(names, cfg.title_column, ("title",), "title", items)
    items_ds = raw_items.map_batches(
        MicroLensItems(cfg, item_col, title_col, image_root, qsource("items", items)),
        batch_format="pyarrow",
    )
    return Sources(items_ds, inter_ds, image_root, cfg.image_dir or "", items, inter)
