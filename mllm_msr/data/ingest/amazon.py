"""Amazon Reviews 2023 adapter (McAuley Lab; ``<Category>.jsonl`` + ``meta_<Category>.jsonl``).

- reviews JSONL: one review per line with ``user_id``, ``parent_asin`` (the item id; ``asin``
  as a fallback) and ``timestamp`` in milliseconds (stored in seconds);
- metadata JSONL: ``parent_asin``, ``title``, ``features`` and ``description`` (lists of strings,
  joined into the item text) and ``images``: a list of ``{"large", "hi_res", "thumb", ...}`` URLs.
  The first ``cfg.max_images_per_item`` images are fetched (``large``, else ``hi_res``, else
  ``thumb``) with a timeout, bounded retries and a concurrency limit.

Lines that are not JSON objects (``bad_json``) or not UTF-8 (``not_utf8``) are quarantined with
``<file>:<line>`` as key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pyarrow as pa

from mllm_msr.config import IngestConfig
from mllm_msr.data.ingest import files
from mllm_msr.data.ingest.common import (
    INTERACTION_ROWS,
    RAW_ITEM_ROWS,
    interaction_row,
    item_row,
    line_key,
    qsource,
    reader_reject,
    reject,
    resolve,
    rows_table,
)
from mllm_msr.data.ingest.readers import LINE, read_lines
from mllm_msr.data.ingest.sources import Sources


def _load(line: str) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _objects(batch: pa.Table, source: str) -> Iterator[tuple[dict | None, dict | None, str]]:
    """``(object, rejected row, key)`` per line of ``batch`` (from :func:`.readers.read_lines`).

    Exactly one of the two is None: lines that cannot be decoded (``not_utf8``) or that are not
    a JSON object (``bad_json``) are rejected with the key ``<file>:<line>``.
    """
    for rec in batch.to_pylist():
        key = line_key(source, rec.get(LINE))
        bad = reader_reject(rec, source)
        if bad is not None:
            yield None, bad, key
            continue
        text = rec["text"]
        obj = _load(text)
        if obj is None:
            detail = f"not a JSON object: {text[:200]!r}"
            yield None, reject({"q_source": source}, "bad_json", detail, key=key), key
        elif _SURROGATE.search(text) and _lone_surrogate(obj):
            detail = f"a \\u escape of a lone UTF-16 surrogate: {text[:200]!r}"
            yield None, reject({"q_source": source}, "not_utf8", detail, key=key), key
        else:
            yield obj, None, key


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: dict) -> bool:
    """Whether ``obj`` holds a string that is not encodable as UTF-8 (``"\\ud800"``)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_reviews(batch: pa.Table, source: str) -> pa.Table:
    rows = []
    for obj, bad, key in _objects(batch, source):
        if bad is not None:
            rows.append(bad)
            continue
        item = obj.get("parent_asin") or obj.get("asin")
        row = interaction_row(obj.get("user_id"), item, obj.get("timestamp"), source, key=key)
        if row["q_reason"] is None:
            row["timestamp"] //= 1000  # milliseconds -> seconds
        rows.append(row)
    return rows_table(rows, INTERACTION_ROWS)


def _join(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value if v)
    return str(value or "").strip()


def image_urls(images) -> list[str]:
    urls = []
    for img in images or []:
        if isinstance(img, dict):
            url = img.get("large") or img.get("hi_res") or img.get("thumb")
        else:
            url = img if isinstance(img, str) else None
        if url:
            urls.append(str(url))
    return urls


def parse_meta(batch: pa.Table, source: str, cfg: IngestConfig) -> pa.Table:
    rows = []
    for obj, bad, _ in _objects(batch, source):
        if bad is not None:
            rows.append(bad)
            continue
        text = " ".join(t for t in (_join(obj.get("features")), _join(obj.get("description"))) if t)
        rows.append(
            item_row(
                obj.get("parent_asin") or obj.get("asin"),
                obj.get("title"),
                text,
                image_urls(obj.get("images")),
                source,
                cfg,
            )
        )
    return rows_table(rows, RAW_ITEM_ROWS)


def _find(root: str, meta: bool) -> str:
    hits = [
        p for p in files.glob(root, "*.jsonl") if p.rsplit("/", 1)[-1].startswith("meta_") == meta
    ]
    if not hits:
        raise FileNotFoundError(f"amazon: no {'meta_*' if meta else 'reviews'} .jsonl under {root}")
    return hits[0]


def amazon_sources(cfg: IngestConfig) -> Sources:
    if not cfg.root:
        raise ValueError("ingest.root is required for format=amazon")
    files.check_root(cfg.root, "amazon")
    reviews = resolve(cfg.root, cfg.interactions) if cfg.interactions else _find(cfg.root, False)
    meta = resolve(cfg.root, cfg.items) if cfg.items else _find(cfg.root, True)
    n = cfg.num_shards
    inter_ds = read_lines(reviews, n).map_batches(
        parse_reviews,
        fn_kwargs={"source": qsource("interactions", reviews)},
        batch_format="pyarrow",
    )
    items_ds = read_lines(meta, n).map_batches(
        parse_meta, fn_kwargs={"source": qsource("items", meta), "cfg": cfg}, batch_format="pyarrow"
    )
    return Sources(items_ds, inter_ds, None, "urls", meta, reviews)
