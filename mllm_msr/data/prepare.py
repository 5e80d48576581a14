"""The evaluation protocol: k-core, chronological sequences, user split, candidates.

Pure functions over pyarrow tables and numpy arrays; the prepare stage
(:mod:`mllm_msr.stages.prepare`) runs :func:`build_examples` over blocks of users with Ray Data.

Scale: :func:`kcore` and :func:`user_sequences` work in memory on the driver over integer codes
(about 40 bytes per interaction: MicroLens-50k's 360k rows take ~15 MB and < 1 s; a single node
handles tens of millions of interactions). The per-user work (histories, negatives) is
distributed and, by construction, independent of how users are split into blocks: the split is a
seeded permutation of the sorted user ids, and each user's negatives come from its own RNG seeded
by ``hash(seed, user_id, split)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_msr.config import PrepareConfig

#: One row per (user, split) example: the sequence and its candidates (written as two tables).
EXAMPLES = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("history", pa.list_(pa.string())),
        ("target", pa.string()),
        ("candidates", pa.list_(pa.string())),
        ("labels", pa.list_(pa.int8())),
    ]
)


@dataclass
class KCoreResult:
    """Rows kept by the k-core filter and what it removed."""

    mask: np.ndarray
    """Boolean mask over the input interactions."""
    rounds: int
    users_before: int
    items_before: int
    users_after: int
    items_after: int


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    enc = pc.dictionary_encode(col)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(enc.dictionary)


def kcore(
    users: pa.Array | pa.ChunkedArray,
    items: pa.Array | pa.ChunkedArray,
    user_core: int,
    item_core: int,
) -> KCoreResult:
    """Iterative (user, item) k-core: drop users with < ``user_core`` interactions and items with
    < ``item_core`` until both conditions hold for every remaining row (a fixed point)."""
    u, n_u = _codes(users)
    i, n_i = _codes(items)
    mask = np.ones(len(u), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        u_cnt = np.bincount(u[mask], minlength=n_u)
        i_cnt = np.bincount(i[mask], minlength=n_i)
        keep = mask & (u_cnt[u] >= user_core) & (i_cnt[i] >= item_core)
        if keep.sum() == mask.sum():
            break
        mask = keep
    return KCoreResult(
        mask=mask,
        rounds=rounds,
        users_before=n_u,
        items_before=n_i,
        users_after=int(np.unique(u[mask]).size),
        items_after=int(np.unique(i[mask]).size),
    )


def user_sequences(interactions: pa.Table) -> pa.Table:
    """One row per user (sorted by id): ``user_id`` and ``items``, chronological.

    Ties in time are broken by item id, so the order does not depend on the input order.
    """
    t = interactions.sort_by(
        [("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    )
    u = t["user_id"].combine_chunks()
    if len(u) == 0:
        return pa.table(
            {"user_id": pa.array([], pa.string()), "items": pa.array([], pa.list_(pa.string()))}
        )
    change = pc.not_equal(u[1:], u[:-1]).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.nonzero(change)[0] + 1])
    offsets = np.concatenate([starts, [len(u)]]).astype(np.int32)
    items = pa.ListArray.from_arrays(pa.array(offsets), t["item_id"].combine_chunks())
    return pa.table({"user_id": u.take(pa.array(starts)), "items": items})


def assign_splits(user_ids: list[str], ratios: list[float], seed: int) -> dict[str, str]:
    """Seeded user-level split: a permutation of the sorted ids cut at the given ratios."""
    ids = sorted(user_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_train = int(round(ratios[0] * len(ids)))
    n_val = int(round(ratios[1] * len(ids)))
    labels = np.array(["test"] * len(ids), dtype=object)
    labels[perm[:n_train]] = "train"
    labels[perm[n_train : n_train + n_val]] = "val"
    return dict(zip(ids, labels.tolist()))


def user_rng(seed: int, user_id: str, split: str) -> np.random.Generator:
    """The RNG of one user's negatives: a function of (seed, user, split) only."""
    digest = hashlib.blake2b(f"{seed}|{user_id}|{split}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_negatives(
    rng: np.random.Generator, pool_size: int, exclude: np.ndarray, k: int
) -> np.ndarray:
    """``k`` distinct pool indices drawn uniformly from those not in ``exclude``."""
    excluded = set(exclude.tolist())
    k = min(k, pool_size - len(excluded))
    chosen: list[int] = []
    taken = set(excluded)
    while len(chosen) < k:
        for idx in rng.integers(0, pool_size, size=2 * (k - len(chosen)) + 4).tolist():
            if idx not in taken:
                taken.add(idx)
                chosen.append(idx)
                if len(chosen) == k:
                    break
    return np.asarray(chosen, dtype=np.int64)


def _targets(n: int, split: str, mode: str) -> list[tuple[str, int]]:
    """(split, target position) pairs of a user with ``n`` items."""
    if mode == "user":
        return [(split, n - 1)]
    # leave-one-out: every user in every split: test = last, val = 2nd last, train = 3rd last
    out = [(s, n - back) for s, back in (("train", 3), ("val", 2), ("test", 1)) if n - back >= 1]
    return out


def build_examples(users: pa.Table, pool: np.ndarray, cfg: PrepareConfig) -> pa.Table:
    """Per user: the example(s) of its split, with seeded negatives (``EXAMPLES`` rows).

    ``users`` has ``user_id``, ``split`` (ignored for leave-one-out) and chronological
    ``items``; ``pool`` is the sorted array of candidate item ids (every item after k-core).
    Negatives are never among the user's items (history, target or later items).
    """
    rows: dict[str, list] = {name: [] for name in EXAMPLES.names}
    cols = [users[c].to_pylist() for c in ("user_id", "split", "items")]
    for uid, user_split, items in zip(*cols):
        own = np.searchsorted(pool, np.asarray(items, dtype=str))
        for split, pos in _targets(len(items), user_split, cfg.split):
            k = cfg.train_negatives if split == "train" else cfg.eval_negatives
            neg = sample_negatives(user_rng(cfg.seed, uid, split), len(pool), own, k)
            rows["user_id"].append(uid)
            rows["split"].append(split)
            first = 0 if cfg.max_history is None else max(0, pos - cfg.max_history)
            rows["history"].append(items[first:pos])
            rows["target"].append(items[pos])
            rows["candidates"].append([items[pos], *pool[neg].tolist()])
            rows["labels"].append([1] + [0] * len(neg))
    return pa.table(rows, schema=EXAMPLES)


def with_splits(seqs: pa.Table, cfg: PrepareConfig) -> pa.Table:
    """Add the ``split`` column (user split; ``""`` for leave-one-out, where users are in all)."""
    ids = seqs["user_id"].to_pylist()
    if cfg.split == "user":
        split_of = assign_splits(ids, cfg.split_ratios, cfg.seed)
        labels = [split_of[u] for u in ids]
    else:
        labels = [""] * len(ids)
    return seqs.append_column("split", pa.array(labels, pa.string()))


def sample_split_users(seqs: pa.Table, max_users: dict[str, int], seed: int) -> pa.Table:
    """Keep at most ``max_users[split]`` users of each split (seeded, row order kept).

    The sample of a split depends only on ``seed``, the split's user ids and its size bound,
    so two runs with the same bound keep the same users whatever the other splits' bounds.
    """
    if not max_users:
        return seqs
    ids = seqs["user_id"].to_pylist()
    splits = seqs["split"].to_pylist()
    keep = np.ones(len(ids), dtype=bool)
    for split, limit in sorted(max_users.items()):
        members = sorted(u for u, s in zip(ids, splits) if s == split)
        if len(members) <= limit:
            continue
        digest = hashlib.blake2b(f"{seed}|sample|{split}".encode(), digest_size=16).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        chosen = set(np.asarray(members)[rng.permutation(len(members))[:limit]].tolist())
        for i, (u, s) in enumerate(zip(ids, splits)):
            if s == split and u not in chosen:
                keep[i] = False
    return seqs.filter(pa.array(keep))


def sequences_of(examples: pa.Table) -> pa.Table:
    return examples.select(["user_id", "split", "history", "target"])


def candidates_of(examples: pa.Table) -> pa.Table:
    """Explode the candidate lists into one row per (user, split, item)."""
    lengths = pc.list_value_length(examples["candidates"]).to_numpy(zero_copy_only=False)
    idx = pa.array(np.repeat(np.arange(examples.num_rows), lengths))
    return pa.table(
        {
            "user_id": examples["user_id"].take(idx),
            "split": examples["split"].take(idx),
            "item_id": pc.list_flatten(examples["candidates"]),
            "label": pc.list_flatten(examples["labels"]),
        }
    )
