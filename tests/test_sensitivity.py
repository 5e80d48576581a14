"""User sensitivity: scores with each user's own preference against another user's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mllm_msr.recommender.samples import derangement, swap_preferences
from mllm_msr.stages.evaluate import user_sensitivity


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=7)
        assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
        assert perm.tolist() == derangement(n, seed=7).tolist()
    with pytest.raises(ValueError):
        derangement(1, 0)


def _samples(n_users: int, n_cand: int = 4) -> pa.Table:
    rows = []
    for u in range(n_users):
        for c in range(n_cand):
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{u}-{c}",
                    "label": int(c == 0),
                    "preference": f"likes topic {u}",
                }
            )
    return pa.Table.from_pylist(rows)


def test_swapped_preferences_come_from_another_user_rows_unchanged():
    samples = _samples(5)
    swapped = swap_preferences(samples, seed=3)
    assert swapped.drop(["preference"]).equals(samples.drop(["preference"]))
    own = dict(zip(samples["user_id"].to_pylist(), samples["preference"].to_pylist()))
    new = dict(zip(swapped["user_id"].to_pylist(), swapped["preference"].to_pylist()))
    assert all(new[u] != own[u] for u in own) and sorted(new.values()) == sorted(own.values())


def _score(samples: pa.Table, reads_user: bool) -> pa.Table:
    """A toy recommender: with ``reads_user`` it scores the positive high only when the
    preference names the candidate's user (the item's topic); else by a fixed item prior."""
    scores = []
    for r in samples.to_pylist():
        topic = r["item_id"].split("-")[0][1:]
        prior = 0.1 * int(r["item_id"].split("-")[1] == "1")
        match = reads_user and r["preference"] == f"likes topic {topic}" and r["label"] == 1
        scores.append(0.9 if match else prior)
    return samples.append_column("score", pa.array(scores, pa.float64()))


def test_user_sensitivity_is_large_for_a_model_that_reads_the_user_and_zero_otherwise():
    samples = _samples(30)
    swapped = swap_preferences(samples, seed=0)
    reads = user_sensitivity(_score(samples, True), _score(swapped, True), [1, 5], seed=0)
    d, lo, hi = reads["own_minus_swapped"]["auc"]
    assert reads["own"]["auc"] == 1.0 and d > 0.3 and lo > 0
    blind = user_sensitivity(_score(samples, False), _score(swapped, False), [1, 5], seed=0)
    assert blind["own_minus_swapped"]["auc"] == [0.0, 0.0, 0.0]
    assert set(blind["own"]) == {"auc", "uauc", "hr@5", "ndcg@5", "mrr@5"}
