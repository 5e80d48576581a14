"""Recommendation metrics of the paper's protocol (DESIGN.md §1.4), in pure numpy.

Every function takes flat, aligned arrays (one row per scored (user, candidate) pair):
``user_id``, ``label`` (1 = the user's held-out target, 0 = a sampled negative) and ``score``
(higher = more likely). A *group* is the set of rows of one user.

Definitions
-----------
- **AUC** (over all rows): the probability that a random positive row outscores a random
  negative row, ties counting one half (the Mann-Whitney statistic; the standard AUC). A model
  that gives every row the same score gets exactly 0.5.
- **UAUC** (mean per-user AUC): the same statistic inside each group, averaged over groups.
- **Rank** of a group's positive: ``1 + #negatives whose score >= the positive's score``.
  Ties are *pessimistic*: a negative that ties the positive ranks above it, so a model that
  gives every candidate the same score ranks the positive last (HR@1 = 0), never first.
- **HR@k** = 1 if rank <= k; **MRR@k** = 1 / rank if rank <= k else 0;
  **NDCG@k** = 1 / log2(rank + 1) if rank <= k else 0 (one relevant item, so the ideal DCG is 1).
  Each is averaged over the evaluated groups.

Degenerate groups
-----------------
The protocol gives each user exactly one positive and N negatives. A group with more than one
positive is a protocol violation and always raises ``ValueError``. A group with no positive or
no negative has no defined rank: with ``on_degenerate="skip"`` (default) it is left out of the
per-user metrics (UAUC, HR, MRR, NDCG) and counted in ``n_users_skipped``; with
``on_degenerate="raise"`` it raises. The all-rows AUC always uses every row given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10)


def auc(label: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None) -> float:
    """AUC over all rows (Mann-Whitney, ties count 0.5), optionally with integer row weights.

    Weights let a bootstrap resample users without materializing repeated rows: a row of
    weight w counts as w copies. Returns NaN when there is no positive or no negative.
    """
    label = np.asarray(label).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    w = np.ones(len(score)) if weight is None else np.asarray(weight, dtype=np.float64)
    _check_scores(score)
    # Distinct score values in ascending order; per value, the weighted positives and negatives.
    values, inverse = np.unique(score, return_inverse=True)
    pos = np.bincount(inverse, weights=w * label, minlength=len(values))
    neg = np.bincount(inverse, weights=w * ~label, minlength=len(values))
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives strictly below each value
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


@dataclass(frozen=True)
class GroupRanks:
    """Per-group results of :func:`group_ranks` (one entry per evaluated group)."""

    users: np.ndarray
    """User ids of the evaluated groups, sorted."""
    rank: np.ndarray
    """Pessimistic rank of the positive (1 = best)."""
    auc: np.ndarray
    """Per-group AUC (ties 0.5)."""
    n_candidates: np.ndarray
    """Rows in the group."""
    n_skipped_no_positive: int
    n_skipped_no_negative: int


def group_ranks(
    user_id: Sequence | np.ndarray,
    label: Sequence | np.ndarray,
    score: Sequence | np.ndarray,
    on_degenerate: Literal["skip", "raise"] = "skip",
) -> GroupRanks:
    """Rank each group's single positive among its negatives (ties pessimistic), vectorized."""
    user_id = np.asarray(user_id)
    label = np.asarray(label)
    score = np.asarray(score, dtype=np.float64)
    if not (len(user_id) == len(label) == len(score)):
        raise ValueError(
            f"user_id, label, score differ in length: {len(user_id)}, {len(label)}, {len(score)}"
        )
    if on_degenerate not in ("skip", "raise"):
        raise ValueError(f"on_degenerate must be 'skip' or 'raise', got {on_degenerate!r}")
    _check_scores(score)
    if not np.isin(label, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    is_pos = label.astype(bool)

    users, group = np.unique(user_id, return_inverse=True)
    n_groups = len(users)
    n_pos = np.bincount(group, weights=is_pos, minlength=n_groups).astype(np.int64)
    n_rows = np.bincount(group, minlength=n_groups)
    n_neg = n_rows - n_pos
    if (n_pos > 1).any():
        bad = users[n_pos > 1][:5].tolist()
        raise ValueError(f"groups with more than one positive (protocol: one), e.g. {bad}")
    no_pos, no_neg = n_pos == 0, (n_neg == 0) & (n_pos == 1)
    if on_degenerate == "raise" and (no_pos.any() or no_neg.any()):
        raise ValueError(
            f"{int(no_pos.sum())} group(s) without a positive, "
            f"{int(no_neg.sum())} without a negative, e.g. {users[no_pos | no_neg][:5].tolist()}"
        )

    # Broadcast each group's positive score to its rows (NaN where the group has none).
    pos_score = np.full(n_groups, np.nan)
    pos_score[group[is_pos]] = score[is_pos]
    row_pos = pos_score[group]
    neg_rows = ~is_pos
    above = np.bincount(group, weights=neg_rows & (score > row_pos), minlength=n_groups)
    tied = np.bincount(group, weights=neg_rows & (score == row_pos), minlength=n_groups)
    below = n_neg - above - tied

    keep = (n_pos == 1) & (n_neg > 0)
    rank = (1 + above + tied)[keep].astype(np.int64)
    group_auc = (below + 0.5 * tied)[keep] / n_neg[keep]
    return GroupRanks(
        users=users[keep],
        rank=rank,
        auc=group_auc,
        n_candidates=n_rows[keep],
        n_skipped_no_positive=int(no_pos.sum()),
        n_skipped_no_negative=int(no_neg.sum()),
    )


def hit_rate(rank: np.ndarray, k: int) -> np.ndarray:
    """Per-group HR@k (1.0 or 0.0)."""
    return (np.asarray(rank) <= k).astype(np.float64)


def mrr(rank: np.ndarray, k: int) -> np.ndarray:
    """Per-group MRR@k (reciprocal rank, 0 beyond k)."""
    rank = np.asarray(rank, dtype=np.float64)
    return np.where(rank <= k, 1.0 / rank, 0.0)


def ndcg(rank: np.ndarray, k: int) -> np.ndarray:
    """Per-group NDCG@k for one relevant item (ideal DCG = 1)."""
    rank = np.asarray(rank, dtype=np.float64)
    return np.where(rank <= k, 1.0 / np.log2(rank + 1.0), 0.0)


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names of the metrics :func:`evaluate_scores` returns, in display order."""
    names = ["auc", "uauc"]
    for family in ("hr", "mrr", "ndcg"):
        names += [f"{family}@{k}" for k in ks]
    return names


def evaluate_scores(
    table: pa.Table | None = None,
    *,
    user_id: Sequence | np.ndarray | None = None,
    label: Sequence | np.ndarray | None = None,
    score: Sequence | np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    on_degenerate: Literal["skip", "raise"] = "skip",
) -> dict[str, float | int]:
    """All metrics of the protocol for one method's scores.

    Pass either a pyarrow ``table`` with columns ``user_id``, ``label``, ``score`` (e.g. the
    SCORES table of one method) or the three arrays as keywords.

    Returns a flat dict: ``auc``, ``uauc``, ``hr@k``, ``mrr@k``, ``ndcg@k`` for each k (fractions
    in [0, 1], not ×100), ``n_rows`` (rows given), ``n_users`` (groups in the per-user
    metrics), ``n_users_skipped`` (groups with no positive or no negative) and
    ``n_candidates_per_user`` (the mean group size).

    >>> m = evaluate_scores(user_id=["u", "u", "u"], label=[1, 0, 0], score=[0.5, 0.5, 0.1])
    >>> m["auc"], m["hr@1"], m["mrr@3"]
    (0.75, 0.0, 0.5)
    """
    user_id, label, score = _columns(table, user_id, label, score)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    g = group_ranks(user_id, label, score, on_degenerate=on_degenerate)
    out: dict[str, float | int] = {"auc": auc(label, score)}
    out.update(_per_user_means(g.rank, g.auc, ks, weight=None))
    out["n_rows"] = int(len(score))
    out["n_users"] = int(len(g.rank))
    out["n_users_skipped"] = g.n_skipped_no_positive + g.n_skipped_no_negative
    out["n_candidates_per_user"] = float(g.n_candidates.mean()) if len(g.rank) else float("nan")
    return out


def evaluate_methods(
    scores: pa.Table,
    ks: Sequence[int] = DEFAULT_KS,
    on_degenerate: Literal["skip", "raise"] = "skip",
) -> dict[str, dict[str, float | int]]:
    """:func:`evaluate_scores` for each ``method`` of a SCORES table, in order of appearance."""
    if "method" not in scores.column_names:
        raise ValueError("scores table misses column 'method'")
    methods = scores.column("method").to_pylist()
    out: dict[str, dict[str, float | int]] = {}
    for method in dict.fromkeys(methods):
        rows = scores.filter(pa.array([m == method for m in methods]))
        out[method] = evaluate_scores(rows, ks=ks, on_degenerate=on_degenerate)
    return out


def bootstrap_ci(
    table: pa.Table | None = None,
    *,
    user_id: Sequence | np.ndarray | None = None,
    label: Sequence | np.ndarray | None = None,
    score: Sequence | np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals over users (resampled with replacement).

    Each replicate draws as many users as were evaluated; a user drawn c times counts c times
    in every metric, including the all-rows AUC (computed with row weights). Degenerate groups
    are skipped as in :func:`evaluate_scores`. Returns ``{metric: (low, high)}``.
    """
    user_id, label, score = _columns(table, user_id, label, score)
    _, samples = _bootstrap_samples(user_id, label, score, ks, n_boot, seed)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {
        name: (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
        for name, v in samples.items()
    }


def paired_bootstrap_diff(
    first: pa.Table,
    second: pa.Table,
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """``first - second`` for every metric, with a paired percentile bootstrap interval.

    Both score tables must cover the same evaluable users; every replicate resamples the users
    once and computes both methods' metrics on that one sample, so the interval is of the
    difference itself (much narrower than comparing two separate intervals when the methods are
    scored on the same candidates). Returns ``{metric: (difference, low, high)}``.
    """
    users_a, samples_a = _bootstrap_samples(*_columns(first, None, None, None), ks, n_boot, seed)
    users_b, samples_b = _bootstrap_samples(*_columns(second, None, None, None), ks, n_boot, seed)
    if not np.array_equal(users_a, users_b):
        raise ValueError("paired bootstrap needs the same evaluable users in both tables")
    point_a, point_b = evaluate_scores(first, ks=ks), evaluate_scores(second, ks=ks)
    return _paired_intervals(point_a, point_b, samples_a, samples_b, alpha)


def _paired_intervals(
    point_a: dict, point_b: dict, samples_a: dict, samples_b: dict, alpha: float
) -> dict[str, tuple[float, float, float]]:
    """``{metric: (a - b, low, high)}``: the point difference and the percentile interval of
    the replicate differences (both methods' replicates drawn on the same user resamples)."""
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out = {}
    for name in samples_a:
        diff = samples_a[name] - samples_b[name]
        out[name] = (
            float(point_a[name] - point_b[name]),
            float(np.percentile(diff, lo)),
            float(np.percentile(diff, hi)),
        )
    return out


def bootstrap_methods(
    tables: dict[str, pa.Table],
    ks: Sequence[int] = DEFAULT_KS,
    reference: str | None = "fine_tuned",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, float]]]]:
    """Bootstrap intervals of every metric of every method, and paired differences.

    ``tables`` maps each method to its score table (``user_id``, ``label``, ``score``). Users
    are resampled with replacement (:func:`bootstrap_ci`), with the same seed for every method.
    Returns ``(intervals, paired)``:

    - ``intervals[method][metric] = {"value", "lo", "hi"}`` (percentile interval at 1 - alpha);
    - ``paired[other][metric] = {"diff", "lo", "hi"}``: ``reference - other`` with a paired
      bootstrap interval (:func:`paired_bootstrap_diff`), for every other method, when
      ``reference`` is among ``tables``. Methods scored on different users are compared on the
      users they share.

    Each method's replicates are computed once and reused for every pair.
    """
    lo_q, hi_q = 100 * alpha / 2, 100 * (1 - alpha / 2)
    columns = {m: _columns(t, None, None, None) for m, t in tables.items()}
    intervals: dict[str, dict[str, dict[str, float]]] = {}
    drawn: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for method, cols in columns.items():
        point = evaluate_scores(user_id=cols[0], label=cols[1], score=cols[2], ks=ks)
        try:
            drawn[method] = _bootstrap_samples(*cols, ks, n_boot, seed)
        except ValueError:  # no evaluable user
            continue
        intervals[method] = {
            name: {
                "value": float(point[name]),
                "lo": float(np.percentile(v, lo_q)),
                "hi": float(np.percentile(v, hi_q)),
            }
            for name, v in drawn[method][1].items()
        }
    paired: dict[str, dict[str, dict[str, float]]] = {}
    if reference not in drawn:
        return intervals, paired
    for other in drawn:
        if other == reference:
            continue
        ref_cols, other_cols = columns[reference], columns[other]
        ref_draw, other_draw = drawn[reference], drawn[other]
        if not np.array_equal(ref_draw[0], other_draw[0]):  # compare on the shared users
            shared = np.intersect1d(ref_draw[0], other_draw[0])
            if len(shared) == 0:
                continue
            ref_cols = tuple(c[np.isin(ref_cols[0], shared)] for c in ref_cols)
            other_cols = tuple(c[np.isin(other_cols[0], shared)] for c in other_cols)
            ref_draw = _bootstrap_samples(*ref_cols, ks, n_boot, seed)
            other_draw = _bootstrap_samples(*other_cols, ks, n_boot, seed)
        point_ref = evaluate_scores(
            user_id=ref_cols[0], label=ref_cols[1], score=ref_cols[2], ks=ks
        )
        point_other = evaluate_scores(
            user_id=other_cols[0], label=other_cols[1], score=other_cols[2], ks=ks
        )
        diffs = _paired_intervals(point_ref, point_other, ref_draw[1], other_draw[1], alpha)
        paired[other] = {
            name: {"diff": d, "lo": lo, "hi": hi} for name, (d, lo, hi) in diffs.items()
        }
    return intervals, paired


def _bootstrap_samples(
    user_id: np.ndarray,
    label: np.ndarray,
    score: np.ndarray,
    ks: Sequence[int],
    n_boot: int,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The evaluable users (sorted) and every metric over ``n_boot`` user resamples.

    The resamples depend only on ``seed`` and the number of users, so two methods scored on the
    same users get the same resamples (what :func:`paired_bootstrap_diff` relies on).
    """
    g = group_ranks(user_id, label, score, on_degenerate="skip")
    n = len(g.users)
    if n == 0:
        raise ValueError("no evaluable user groups to bootstrap")
    # Rows of evaluated groups, and the index of each row's group among g.users.
    row_group = np.searchsorted(g.users, user_id)
    in_eval = (row_group < n) & (g.users[np.minimum(row_group, n - 1)] == user_id)
    row_group, row_label, row_score = row_group[in_eval], label[in_eval], score[in_eval]

    rng = np.random.default_rng(seed)
    samples = {name: np.empty(n_boot) for name in metric_names(ks)}
    # The all-rows AUC of :func:`auc` with row weights, its score sort done once.
    n_values = len(values := np.unique(row_score))
    inverse = np.searchsorted(values, row_score)
    is_pos = row_label.astype(bool)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        w = counts[row_group]
        pos = np.bincount(inverse[is_pos], weights=w[is_pos], minlength=n_values)
        neg = np.bincount(inverse[~is_pos], weights=w[~is_pos], minlength=n_values)
        n_pos, n_neg = pos.sum(), neg.sum()
        below = np.cumsum(neg) - neg
        samples["auc"][b] = (
            float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
            if n_pos and n_neg
            else float("nan")
        )
        for name, value in _per_user_means(g.rank, g.auc, ks, weight=counts).items():
            samples[name][b] = value
    return g.users, samples


# internals ----------------------------------------------------------------------------------


def _per_user_means(
    rank: np.ndarray, group_auc: np.ndarray, ks: Sequence[int], weight: np.ndarray | None
) -> dict[str, float]:
    """Weighted means over groups of UAUC and HR/MRR/NDCG@k (NaN when there is no group)."""
    if len(rank) == 0:
        return {name: float("nan") for name in metric_names(ks)[1:]}
    out = {"uauc": float(np.average(group_auc, weights=weight))}
    for name, fn in (("hr", hit_rate), ("mrr", mrr), ("ndcg", ndcg)):
        for k in ks:
            out[f"{name}@{k}"] = float(np.average(fn(rank, k), weights=weight))
    return out


def _columns(table, user_id, label, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if table is not None:
        if any(x is not None for x in (user_id, label, score)):
            raise ValueError("pass either a table or the user_id/label/score arrays, not both")
        missing = [c for c in ("user_id", "label", "score") if c not in table.column_names]
        if missing:
            raise ValueError(f"scores table misses column(s) {missing}")
        user_id = table.column("user_id").to_numpy(zero_copy_only=False)
        label = table.column("label").to_numpy(zero_copy_only=False)
        score = table.column("score").to_numpy(zero_copy_only=False)
    if user_id is None or label is None or score is None:
        raise ValueError("user_id, label and score are all required")
    user_id, label = np.asarray(user_id), np.asarray(label).astype(np.int64)
    score = np.asarray(score, dtype=np.float64)
    if not (len(user_id) == len(label) == len(score)):
        raise ValueError(
            f"user_id, label, score differ in length: {len(user_id)}, {len(label)}, {len(score)}"
        )
    return user_id, label, score


def _check_scores(score: np.ndarray) -> None:
    """NaN has no order: refuse it rather than rank it arbitrarily (±inf is fine)."""
    if np.isnan(score).any():
        raise ValueError(f"{int(np.isnan(score).sum())} score(s) are NaN")
