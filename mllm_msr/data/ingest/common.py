"""Shared machinery of the ingest adapters: routed rows, validation, dedupe, image loading, sink.

Every adapter turns its raw files into two Ray Datasets of *routed rows*: the columns of the
output table (items or interactions) plus four quarantine columns ``q_reason``, ``q_source``,
``q_key``, ``q_detail``. A row whose ``q_reason`` is null is good; any other row is a rejection.
The pipeline is the same for every format::

    parse (adapter, map_batches) -> dedupe (groupby + map_groups) -> [images (map_batches)]
      -> RoutedParquetSink: good rows -> items/ or interactions/, rejections -> quarantine/ingest/

One input row becomes exactly one routed row (an item may add one extra row per rejected image),
so ``read = written + quarantined`` holds by construction; the sink counts both per reason.
``q_source`` is ``"<kind>:<file>"`` with kind ``items``, ``images`` or ``interactions``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_msr.config import IngestConfig
from mllm_msr.data import schema
from mllm_msr.data.images import (
    HostAllowlist,
    ImageError,
    NormalizedImage,
    fetch_url,
    image_set_hash,
    is_url,
    normalize_image,
    read_image_file,
)
from mllm_msr.data.ingest import files, readers
from mllm_msr.runtime import RunDir

STAGE = "ingest"
Q_FIELDS = [
    ("q_reason", pa.string()),
    ("q_source", pa.string()),
    ("q_key", pa.string()),
    ("q_detail", pa.string()),
]
Q_COLUMNS = [name for name, _ in Q_FIELDS]

#: Parsed item rows before images are loaded: references (relative paths or URLs), not bytes.
RAW_ITEM_ROWS = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("image_refs", pa.list_(pa.string())),
        *Q_FIELDS,
    ]
)
ITEM_ROWS = pa.schema([*schema.ITEMS, *Q_FIELDS])
INTERACTION_ROWS = pa.schema([*schema.INTERACTIONS, *Q_FIELDS])


def qsource(kind: str, file: str) -> str:
    return f"{kind}:{Path(file).name if file else ''}"


def rows_table(rows: list[dict], row_schema: pa.Schema) -> pa.Table:
    """Build a routed table from dicts (missing columns are null)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in row_schema}
    return pa.table(cols, schema=row_schema)


def reject(
    row: dict, reason: str, detail: str, key: str | None = None, source: str | None = None
) -> dict:
    """Mark a routed row as rejected (keeps its other columns for debugging)."""
    return {
        "user_id": "",
        "item_id": "",
        **row,
        "q_reason": reason,
        "q_detail": detail[:500],
        "q_key": key if key is not None else row.get("q_key"),
        "q_source": source if source is not None else row.get("q_source"),
    }


def line_key(source: str, line: int | None) -> str:
    """``<file>:<line>``: the quarantine key of a row read from line ``line`` of ``source``'s file."""
    file = source.split(":", 1)[-1]
    return f"{file}:{line}" if line is not None else file


def reader_reject(record: dict, source: str) -> dict | None:
    """The rejected routed row of a record the line reader could not decode or parse, else None.

    ``record`` holds the reader columns of :mod:`.readers` (absent for Parquet inputs).
    """
    reason = record.get(readers.ERROR)
    if reason is None:
        return None
    key = line_key(source, record.get(readers.LINE))
    return reject({"q_source": source}, reason, record.get(readers.DETAIL) or "", key=key)


def clean_str(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


# --------------------------------------------------------------------------- row builders


def item_row(
    item_id: Any, title: Any, text: Any, refs: list[str], source: str, cfg: IngestConfig
) -> dict:
    """A parsed item row, rejected when its id is missing or text is required but empty."""
    iid = clean_str(item_id)
    row = {
        "item_id": iid,
        "title": clean_str(title),
        "text": clean_str(text),
        "image_refs": refs[: cfg.max_images_per_item],
        "q_source": source,
        "q_key": iid,
        "q_reason": None,
    }
    if not iid:
        return reject(row, "missing_id", "empty item id")
    if cfg.require_text and not (row["title"] or row["text"]):
        return reject(row, "empty_text", "item has neither title nor text")
    return row


def interaction_row(user: Any, item: Any, timestamp: Any, source: str, key: str) -> dict:
    """A parsed interaction row, rejected on a missing id or an unparsable timestamp."""
    uid, iid = clean_str(user), clean_str(item)
    row = {
        "user_id": uid,
        "item_id": iid,
        "timestamp": None,
        "q_source": source,
        "q_key": f"{uid}|{iid}" if uid or iid else key,
        "q_reason": None,
    }
    if not uid or not iid:
        return reject(row, "missing_id", f"user={uid!r} item={iid!r} ({key})")
    try:
        row["timestamp"] = parse_timestamp(timestamp)
    except (TypeError, ValueError, OverflowError) as exc:
        return reject(row, "bad_timestamp", f"timestamp {timestamp!r}: {exc} ({key})")
    return row


INT64_MAX = 2**63 - 1


def parse_timestamp(value: Any) -> int:
    """A non-negative int64 from an int, a float or a numeric string (``"1e3"`` -> 1000).

    Raises ``ValueError`` (or ``TypeError``) for anything else: text, NaN, infinities, negative
    values and values beyond int64 (``1e30``).
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            value = float(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    if value < 0:  # before truncation: -0.5 is negative too
        raise ValueError("negative")
    ts = int(value)
    if ts > INT64_MAX:
        raise ValueError("out of the int64 range")
    return ts


# --------------------------------------------------------------------------- dedupe (groupby)


def _good(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    bad = pc.is_valid(table["q_reason"])
    return table.filter(pc.invert(bad)), table.filter(bad)


def _item_rank(r: dict) -> tuple:
    return (
        -int(bool(r["image_refs"])),
        -(len(r["title"]) + len(r["text"])),
        r["title"],
        r["text"],
        tuple(r["image_refs"] or ()),
    )


def dedupe_items(block: pa.Table) -> pa.Table:
    """Keep one row per item id, quarantine the others (``duplicate_item``).

    ``block`` holds every row of its item ids (hash-partitioned by ``item_id``). The kept row is
    chosen from content only, so it does not depend on partitioning: the one with images, then
    the longest title + text, then the smallest (title, text, refs).
    """
    good, bad = _good(block)
    ids = good["item_id"].to_pylist()
    if len(set(ids)) == len(ids):
        return block
    by_id: dict[str, list[dict]] = {}
    for r in good.to_pylist():
        by_id.setdefault(r["item_id"], []).append(r)
    out = []
    for rows in by_id.values():
        rows.sort(key=_item_rank)
        out.append(rows[0])
        out.extend(
            reject(r, "duplicate_item", f"item id {r['item_id']!r} appears {len(rows)} times")
            for r in rows[1:]
        )
    return pa.concat_tables([rows_table(out, RAW_ITEM_ROWS), bad.cast(RAW_ITEM_ROWS)])


def dedupe_interactions(block: pa.Table) -> pa.Table:
    """Keep each user's earliest (user, item) pair, quarantine repeats (``duplicate_interaction``).

    ``block`` holds every row of its users (hash-partitioned by ``user_id``); ties in time are
    broken by item id, so the result does not depend on partitioning.
    """
    good, bad = _good(block)
    good = good.sort_by(
        [("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    )
    seen: set[tuple[str, str]] = set()
    dup = []
    for pair in zip(good["user_id"].to_pylist(), good["item_id"].to_pylist()):
        dup.append(pair in seen)
        seen.add(pair)
    if not any(dup):
        return pa.concat_tables([good, bad])
    mask = pa.array(dup)
    repeats = good.filter(mask).to_pylist()
    rejected = [
        reject(r, "duplicate_interaction", f"user {r['user_id']} already has item {r['item_id']}")
        for r in repeats
    ]
    return pa.concat_tables(
        [good.filter(pc.invert(mask)), rows_table(rejected, INTERACTION_ROWS), bad]
    )


def dedupe(ds: Any, key: str, fn: Any, num_blocks: int) -> Any:
    """Hash-partition ``ds`` by ``key`` (all rows of a key in one block), then ``fn`` per block.

    This is how Ray Data's own ``groupby(key).map_groups`` co-locates groups (Ray 2.60), but
    ``fn`` sees a whole block of many keys at once and works vectorized instead of being called
    once per group (per-group calls cost ~1 ms each: 50k users took 3x longer).
    """
    return ds.repartition(num_blocks, keys=[key]).map_batches(
        fn, batch_format="pyarrow", batch_size=None
    )


# --------------------------------------------------------------------------- images


class ImageLoader:
    """``map_batches`` callable: raw item rows (references) -> item rows with normalized images.

    Local references are paths under ``image_root`` (escapes refused); URLs are fetched with
    ``cfg.http_timeout_s`` per socket operation, ``cfg.http_deadline_s`` per fetch,
    ``cfg.http_retries`` retries, at most ``cfg.http_concurrency`` requests at a time per task,
    and only from public addresses or ``cfg.http_allow_hosts`` (:func:`fetch_url`). Each rejected
    image adds a quarantine row (kind ``images``, key ``<item_id>#<k>``); the item stays,
    text-only, unless ``cfg.require_images``.
    """

    def __init__(self, cfg: IngestConfig, image_root: str | None, image_source: str) -> None:
        self.cfg = cfg
        self.image_root = image_root
        self.image_source = image_source
        self.allow = HostAllowlist.parse(cfg.http_allow_hosts)  # ConfigError on the driver

    def _load(self, ref: str) -> NormalizedImage:
        cfg = self.cfg
        if is_url(ref):
            data = fetch_url(
                ref,
                timeout_s=cfg.http_timeout_s,
                retries=cfg.http_retries,
                max_bytes=cfg.images.max_bytes,
                deadline_s=cfg.http_deadline_s,
                allow=self.allow,
            )
        else:
            if self.image_root is None:
                raise ImageError("missing_image", f"no image root configured for {ref!r}")
            data = read_image_file(self.image_root, ref, cfg.images.max_bytes)
        return normalize_image(data, cfg.images)

    def _try(self, ref: str) -> NormalizedImage | ImageError:
        try:
            return self._load(ref)
        except ImageError as exc:
            return exc

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        refs = [ref for r in rows if r["q_reason"] is None for ref in (r["image_refs"] or [])]
        workers = max(1, min(self.cfg.http_concurrency, len(refs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            loaded = dict(zip(refs, pool.map(self._try, refs))) if refs else {}
        out: list[dict] = []
        for r in rows:
            base = {k: r[k] for k in ("item_id", "title", "text", *Q_COLUMNS)}
            if r["q_reason"] is not None:
                out.append({**base, "images": [], "image_hashes": [], "image_hash": ""})
                continue
            images, hashes, failures = [], [], []
            for k, ref in enumerate(r["image_refs"] or []):
                res = loaded[ref]
                if isinstance(res, ImageError):
                    failures.append(res)
                    out.append(
                        {
                            "item_id": r["item_id"],
                            "q_reason": res.reason,
                            "q_detail": res.detail[:500],
                            "q_key": f"{r['item_id']}#{k}",
                            "q_source": qsource("images", self.image_source),
                        }
                    )
                else:
                    images.append(res.data)
                    hashes.append(res.sha256)
            item = {
                **base,
                "images": images,
                "image_hashes": hashes,
                "image_hash": image_set_hash(hashes),
            }
            if self.cfg.require_images and not images:
                why = failures[0].reason if failures else "missing_image"
                item = reject(item, "no_image", f"no usable image (first problem: {why})")
            out.append(item)
        return rows_table(out, ITEM_ROWS)


# --------------------------------------------------------------------------- sink


def _routed_sink_cls():
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class RoutedParquetSink(Datasink):
        """Writes good rows to ``<table>/`` and rejections to ``quarantine/ingest/``.

        File names are deterministic per write task (``<table>-<task>-<block>.parquet``), so a
        retried task overwrites its own files. ``result`` holds the counts after the write.
        """

        def __init__(
            self, run_uri: str, table: str, table_schema: pa.Schema, stage: str = STAGE
        ) -> None:
            self.run_uri = run_uri
            self.table = table
            self.table_schema = table_schema
            self.stage = stage
            self.result: dict = {}

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict:
            run = RunDir(self.run_uri)
            written = images = 0
            quarantined: Counter = Counter()
            for j, block in enumerate(blocks):
                t = BlockAccessor.for_block(block).to_arrow()
                if t.num_rows == 0:
                    continue
                good, bad = _good(t)
                name = f"{self.table}-{ctx.task_idx:05d}-{j:04d}"
                if good.num_rows:
                    good = good.select(self.table_schema.names).cast(self.table_schema)
                    run.write_table(self.table, good, name)
                    written += good.num_rows
                    if "images" in good.column_names:
                        images += pc.sum(pc.list_value_length(good["images"])).as_py() or 0
                if bad.num_rows:
                    q = quarantine_table(bad, self.stage)
                    run.write_table(f"quarantine/{self.stage}", q, name)
                    kinds = [s.split(":", 1)[0] for s in q["source"].to_pylist()]
                    quarantined.update(f"{k}|{r}" for k, r in zip(kinds, q["reason"].to_pylist()))
            return {"written": written, "images": images, "quarantined": dict(quarantined)}

        def on_write_complete(self, write_result: Any) -> None:
            total: Counter = Counter()
            written = images = 0
            for r in write_result.write_returns:
                if r:
                    written += r["written"]
                    images += r["images"]
                    total.update(r["quarantined"])
            self.result = {"written": written, "images": images, "quarantined": dict(total)}

    return RoutedParquetSink


def quarantine_table(bad: pa.Table, stage: str) -> pa.Table:
    n = bad.num_rows
    return pa.table(
        {
            "stage": pa.array([stage] * n, pa.string()),
            "source": bad["q_source"].fill_null(""),
            "key": bad["q_key"].fill_null(""),
            "reason": bad["q_reason"],
            "detail": bad["q_detail"].fill_null(""),
        },
        schema=schema.QUARANTINE,
    )


def write_routed(ds: Any, run: RunDir, table: str, table_schema: pa.Schema) -> dict:
    """Stream ``ds`` (routed rows) into ``table`` and ``quarantine/ingest``; return counts."""
    sink = _routed_sink_cls()(run.uri, table, table_schema)
    ds.write_datasink(sink)
    if not run.table_files(table):  # every row rejected: still leave a readable empty table
        run.write_table(table, table_schema.empty_table(), f"{table}-empty")
    return sink.result


# --------------------------------------------------------------------------- readers


def resolve(root: str | None, path: str) -> str:
    """``path`` relative to ``root`` (a local path or a URI) unless absolute (or a URI)."""
    if "://" in path or Path(path).is_absolute() or root is None:
        return path
    return files.join(root, path)


def read_table_file(path: str, num_blocks: int | None = None) -> tuple[Any, list[str]]:
    """A Ray Dataset over a CSV (every column read as a string) or Parquet file, and its columns.

    The column names come from the CSV header / Parquet footer (no pass over the data). CSV
    records carry the reader columns of :mod:`.readers` (line number, error): a malformed or
    undecodable record is a row to quarantine (:func:`reader_reject`), not a failed read.
    """
    import ray.data

    folder = files.is_dir(path)
    if path.endswith(".parquet") or folder:
        if folder:
            parts = [f for f in files.list_files(path, recursive=True) if f.endswith(".parquet")]
            if not parts:
                raise FileNotFoundError(f"{path}: a folder without .parquet files")
            first = parts[0]
        else:
            first = path
        fs, inner = files.filesystem(first)
        names = pq.read_schema(inner, filesystem=fs).names
        return ray.data.read_parquet(path, override_num_blocks=num_blocks), names
    return readers.read_csv_rows(path, num_blocks)


def pick_column(
    names: list[str],
    wanted: str | None,
    aliases: tuple[str, ...],
    what: str,
    path: str,
    required: bool = True,
) -> str | None:
    """The first of ``wanted`` / ``aliases`` present in ``names``."""
    for cand in ([wanted] if wanted else []) + list(aliases):
        if cand in names:
            return cand
    if required:
        raise ValueError(f"{path}: no {what} column (tried {[wanted, *aliases]}); has {names}")
    return None
