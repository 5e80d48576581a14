"""SFT samples for the recommender: one row per (user, candidate) of a split.

A sample holds what the shared prompt (:func:`mllm_msr.prompts.recommender_messages`) needs: the
user's preference state that precedes the target, the candidate's title, item summary and first
image, and the label (1 = the target, "Yes"; 0 = a sampled negative, "No").

The preference state is the user's ``preferences`` row with ``is_final`` and
``consumed == len(history)``: the recurrent summary of exactly the history before the target.
Users without such a row (the preference stage skipped them or is stale) are, by default, given a
**titles-only history** instead (``The user recently interacted with: A; B; C``), the input of the
paper's "no preference summarizer" variants; they are counted in ``fallback_users`` so that a run
where many users fall back is visible. ``missing_preference="quarantine"`` drops those users'
candidates into ``quarantine/`` rows instead. Candidates naming an unknown item are always
quarantined (reason ``unknown_item``).
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import pyarrow as pa

from mllm_msr.data import schema

SFT_SAMPLES = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int8()),
        ("preference", pa.string()),
        ("preference_source", pa.string()),  # "final" | "titles"
        ("title", pa.string()),
        ("summary", pa.string()),
        ("image", pa.binary()),  # the candidate's first normalized image; null when none
        ("history_titles", pa.list_(pa.string())),  # the user's history titles, oldest first
    ]
)
"""Columns of the in-memory SFT table handed to Ray Train."""

TITLES_PREFIX = "The user recently interacted with: "


def titles_history(titles: list[str]) -> str:
    """The fallback preference text: the history's titles, oldest first."""
    return TITLES_PREFIX + "; ".join(t for t in titles if t) + "."


def _fields(table_schema: pa.Schema, *names: str) -> pa.Schema:
    """The sub-schema of the columns this module reads."""
    return pa.schema([table_schema.field(n) for n in names])


def final_preferences(preferences: pa.Table | None, sequences: pa.Table) -> dict[str, str]:
    """Per user, the final preference text that read exactly the user's history."""
    if preferences is None or preferences.num_rows == 0:
        return {}
    schema.check_columns(
        preferences,
        _fields(schema.PREFERENCES, "user_id", "consumed", "text", "is_final"),
        "preferences",
    )
    history_len = {
        u: len(h)
        for u, h in zip(
            sequences.column("user_id").to_pylist(), sequences.column("history").to_pylist()
        )
    }
    out: dict[str, str] = {}
    cols = preferences.select(["user_id", "consumed", "text", "is_final"]).to_pydict()
    for user, consumed, text, is_final in zip(
        cols["user_id"], cols["consumed"], cols["text"], cols["is_final"]
    ):
        if is_final and text and history_len.get(user) == consumed:
            out[user] = text
    return out


def build_sft_samples(
    candidates: pa.Table,
    sequences: pa.Table,
    items: pa.Table,
    item_summaries: pa.Table | None = None,
    preferences: pa.Table | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    missing_preference: Literal["titles", "quarantine"] = "titles",
    stage: str = "train",
) -> tuple[pa.Table, pa.Table, dict]:
    """Build the SFT table (:data:`SFT_SAMPLES`) for ``splits``.

    Returns ``(samples, quarantine, stats)``; ``stats`` counts samples per split, positives,
    users that fell back to titles, candidates without an image and quarantined rows.
    Rows are ordered by split, user, then candidate (stable, deterministic). ``stage`` names
    the caller in quarantine rows (the evaluate stage builds its test samples here too).
    """
    schema.check_columns(candidates, schema.CANDIDATES, "candidates")
    schema.check_columns(sequences, schema.SEQUENCES, "sequences")
    schema.check_columns(items, _fields(schema.ITEMS, "item_id", "title", "images"), "items")
    if item_summaries is not None:
        schema.check_columns(
            item_summaries, _fields(schema.ITEM_SUMMARIES, "item_id", "summary"), "item_summaries"
        )

    item_cols = items.select(["item_id", "title", "images"]).to_pydict()
    titles = dict(zip(item_cols["item_id"], item_cols["title"]))
    images = {
        i: (imgs[0] if imgs else None) for i, imgs in zip(item_cols["item_id"], item_cols["images"])
    }
    summaries: dict[str, str] = {}
    if item_summaries is not None:
        s = item_summaries.select(["item_id", "summary"]).to_pydict()
        summaries = dict(zip(s["item_id"], s["summary"]))
    seq = sequences.select(["user_id", "history"]).to_pydict()
    histories = dict(zip(seq["user_id"], seq["history"]))
    finals = final_preferences(preferences, sequences)

    rows: dict[str, list] = {f.name: [] for f in SFT_SAMPLES}
    quarantine: dict[str, list] = {f.name: [] for f in schema.QUARANTINE}
    fallback_users: set[str] = set()
    per_split: Counter[str] = Counter()
    no_image = 0

    def reject(user: str, item: str, reason: str, detail: str) -> None:
        for k, v in zip(
            ("stage", "source", "key", "reason", "detail"),
            (stage, "candidates", f"{user}|{item}", reason, detail),
        ):
            quarantine[k].append(v)

    cand = candidates.select(["user_id", "split", "item_id", "label"]).to_pydict()
    order = sorted(
        (i for i, sp in enumerate(cand["split"]) if sp in splits),
        key=lambda i: (splits.index(cand["split"][i]), cand["user_id"][i], i),
    )
    for i in order:
        user, split, item, label = (cand[k][i] for k in ("user_id", "split", "item_id", "label"))
        if item not in titles:
            reject(user, item, "unknown_item", f"candidate item {item!r} is not in items/")
            continue
        if user in finals:
            preference, source = finals[user], "final"
        elif missing_preference == "quarantine":
            reject(user, item, "missing_preference", "no final preference for the full history")
            continue
        else:
            history = histories.get(user) or []
            preference, source = titles_history([titles.get(h, "") for h in history]), "titles"
            fallback_users.add(user)
        image = images.get(item)
        no_image += image is None
        history_titles = [titles.get(h) or "" for h in histories.get(user) or []]
        for k, v in zip(
            SFT_SAMPLES.names,
            (
                user,
                split,
                item,
                label,
                preference,
                source,
                titles[item],
                summaries.get(item, ""),
                image,
                history_titles,
            ),
        ):
            rows[k].append(v)
        per_split[split] += 1

    samples = pa.Table.from_pydict(rows, schema=SFT_SAMPLES)
    quarantined = pa.Table.from_pydict(quarantine, schema=schema.QUARANTINE)
    stats = {
        "samples": samples.num_rows,
        "per_split": dict(per_split),
        "positives": int(sum(1 for v in rows["label"] if v == 1)),
        "fallback_users": len(fallback_users),
        "without_image": int(no_image),
        "quarantined": quarantined.num_rows,
        "rows_in": len(order),
    }
    return samples, quarantined, stats


def derangement(n: int, seed: int):
    """A seeded permutation of ``range(n)`` with no fixed point (``n >= 2``)."""
    import numpy as np

    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def swap_preferences(samples: pa.Table, seed: int) -> pa.Table:
    """``samples`` with every user's preference text replaced by another user's (a seeded
    derangement of the users), candidates and labels unchanged: the counterfactual that tells
    whether a recommender reads its user (its AUC should drop)."""
    users = sorted(set(samples["user_id"].to_pylist()))
    other = dict(zip(users, (users[j] for j in derangement(len(users), seed))))
    out = samples
    for column in ("preference", "history_titles"):  # everything the prompt knows of the user
        if column not in samples.column_names:
            continue
        of = dict(zip(samples["user_id"].to_pylist(), samples[column].to_pylist()))
        swapped = [of[other[u]] for u in samples["user_id"].to_pylist()]
        index = out.schema.get_field_index(column)
        out = out.set_column(index, column, pa.array(swapped, samples.schema.field(column).type))
    return out
