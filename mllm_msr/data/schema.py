"""Columns of every table a stage writes under the run directory.

Ids are strings everywhere (Amazon ASINs, MicroLens integers and user catalogs alike). Each
stage checks its input against these schemas with :func:`check_columns` and fails with a clear
message naming the missing columns.
"""

from __future__ import annotations

import pyarrow as pa

# ingest ---------------------------------------------------------------------------------
ITEMS = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),  # description / features; may be empty
        ("images", pa.list_(pa.binary())),  # normalized (RGB, resized, re-encoded) image bytes
        ("image_hashes", pa.list_(pa.string())),  # sha256 of each normalized image
        ("image_hash", pa.string()),  # sha256 over the ordered image hashes; "" when no image
    ]
)

INTERACTIONS = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),  # seconds, or the position in the user's sequence
    ]
)

QUARANTINE = pa.schema(
    [
        ("stage", pa.string()),  # which stage rejected the row
        ("source", pa.string()),  # file / table the row came from
        ("key", pa.string()),  # the row's id (item id, "user|item", line number ...)
        ("reason", pa.string()),  # short machine-readable reason, e.g. "corrupt_image"
        ("detail", pa.string()),  # human-readable detail
    ]
)


def quarantine_row(stage: str, source: str, key: str, reason: str, detail: str) -> dict[str, str]:
    """One ``QUARANTINE`` row: every stage builds its rows here, under ``quarantine/<stage>/``."""
    return {"stage": stage, "source": source, "key": key, "reason": reason, "detail": detail}


# prepare --------------------------------------------------------------------------------
SEQUENCES = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),  # train | val | test
        ("history", pa.list_(pa.string())),  # most recent max_history items before the target
        ("target", pa.string()),
    ]
)

CANDIDATES = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int8()),  # 1 = the target, 0 = a sampled negative
    ]
)

# item summaries -------------------------------------------------------------------------
ITEM_SUMMARIES = pa.schema(
    [
        ("item_id", pa.string()),
        ("summary", pa.string()),
        ("image_hash", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
    ]
)

# user preferences -----------------------------------------------------------------------
PREFERENCES = pa.schema(
    [
        ("user_id", pa.string()),
        ("consumed", pa.int64()),  # number of history items this state has read
        ("text", pa.string()),
        ("is_final", pa.bool_()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
    ]
)

PREFERENCES_WRITTEN = PREFERENCES.append(
    # sha256 of the model, prompt version, settings and consumed items: the reuse key of the
    # incremental refresh. Written by the user_preferences stage; readers need only PREFERENCES.
    pa.field("inputs_hash", pa.string())
)

# evaluation -----------------------------------------------------------------------------
SCORES = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int8()),
        ("score", pa.float64()),
        ("method", pa.string()),
    ]
)


def check_columns(table_or_names, schema: pa.Schema, what: str) -> None:
    """Raise ``ValueError`` naming the columns of ``schema`` missing from the input."""
    names = (
        table_or_names.column_names
        if hasattr(table_or_names, "column_names")
        else list(table_or_names)
    )
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; got {sorted(names)}")


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
