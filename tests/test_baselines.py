"""Popularity, random and SASRec baselines on hand-made and synthetic sequential data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mllm_msr.baselines.common import random_scores
from mllm_msr.baselines.popularity import item_counts, popularity_scores
from mllm_msr.baselines.sasrec import SASRecConfig, fit_sasrec, sasrec_scores
from mllm_msr.data.schema import CANDIDATES, SCORES, SEQUENCES
from mllm_msr.metrics import evaluate_scores


def _sequences(rows: list[tuple[str, str, list[str], str]]) -> pa.Table:
    users, splits, histories, targets = zip(*rows)
    return pa.table(
        {"user_id": users, "split": splits, "history": histories, "target": targets},
        schema=SEQUENCES,
    )


def _candidates(rows: list[tuple[str, str, str, int]]) -> pa.Table:
    users, splits, items, labels = zip(*rows)
    return pa.table(
        {"user_id": users, "split": splits, "item_id": items, "label": labels}, schema=CANDIDATES
    )


# Two training users, one test user whose target "e" must never count.
HAND_SEQUENCES = _sequences(
    [
        ("u1", "train", ["a", "b"], "c"),
        ("u2", "train", ["a"], "b"),
        ("v1", "val", ["b"], "a"),
        ("t1", "test", ["c", "d"], "e"),
    ]
)
HAND_CANDIDATES = _candidates(
    [
        ("u1", "train", "c", 1),
        ("u1", "train", "d", 0),
        ("v1", "val", "a", 1),
        ("v1", "val", "e", 0),
        ("t1", "test", "e", 1),
        ("t1", "test", "a", 0),
        ("t1", "test", "d", 0),
    ]
)


def test_popularity_counts_training_sequences_only():
    # Training sequences: u1 = a b c, u2 = a b -> a: 2, b: 2, c: 1. The val user's a/b and the
    # test user's c, d, e do not count by default.
    assert item_counts(HAND_SEQUENCES) == {"a": 2, "b": 2, "c": 1}
    # With the test users' histories (c, d; never the target e): c: 2, d: 1.
    assert item_counts(HAND_SEQUENCES, "test", include_eval_histories=True) == {
        "a": 2,
        "b": 2,
        "c": 2,
        "d": 1,
    }


def test_popularity_scores_table():
    scores = popularity_scores(HAND_SEQUENCES, HAND_CANDIDATES, split="test")
    assert scores.schema == SCORES
    assert scores.to_pylist() == [
        {"user_id": "t1", "item_id": "e", "label": 1, "score": 0.0, "method": "popularity"},
        {"user_id": "t1", "item_id": "a", "label": 0, "score": 2.0, "method": "popularity"},
        {"user_id": "t1", "item_id": "d", "label": 0, "score": 0.0, "method": "popularity"},
    ]
    # e (0) loses to a (2) and ties d (0): pessimistic rank 3.
    assert evaluate_scores(scores, ks=(1, 3))["hr@1"] == 0.0
    val = popularity_scores(HAND_SEQUENCES, HAND_CANDIDATES, split="val")
    assert val["score"].to_pylist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="no candidates"):
        popularity_scores(HAND_SEQUENCES, HAND_CANDIDATES, split="nope")


def _synthetic(n_users: int = 300, n_items: int = 40, seed: int = 0):
    """Each item is followed by item + 1 (mod n_items); 80/10/10 user split; 1 : 20 candidates."""
    rng = np.random.default_rng(seed)
    seq_rows, cand_rows = [], []
    for u in range(n_users):
        split = "train" if u < 0.8 * n_users else ("val" if u < 0.9 * n_users else "test")
        start, length = rng.integers(n_items), rng.integers(6, 13)
        seq = [f"i{(start + j) % n_items}" for j in range(length)]
        user = f"u{u}"
        seq_rows.append((user, split, seq[:-1][-10:], seq[-1]))
        if split == "train":
            continue
        pool = [f"i{j}" for j in range(n_items) if f"i{j}" not in seq]
        negatives = rng.choice(pool, size=20, replace=False).tolist()
        cand_rows += [(user, split, seq[-1], 1)] + [(user, split, n, 0) for n in negatives]
    return _sequences(seq_rows), _candidates(cand_rows)


SMALL = SASRecConfig(hidden=32, num_blocks=2, num_heads=1, max_len=50, epochs=20, seed=0)


def test_sasrec_learns_next_item_and_beats_popularity_and_random():
    sequences, candidates = _synthetic()
    sasrec = sasrec_scores(sequences, candidates, split="test", cfg=SMALL)
    assert sasrec.schema == SCORES
    assert (
        sasrec.num_rows == candidates.filter(pa.compute.equal(candidates["split"], "test")).num_rows
    )
    assert sasrec["item_id"].to_pylist() == [
        c["item_id"] for c in candidates.to_pylist() if c["split"] == "test"
    ]
    m_sasrec = evaluate_scores(sasrec)
    m_pop = evaluate_scores(popularity_scores(sequences, candidates, split="test"))
    m_rand = evaluate_scores(random_scores(sequences, candidates, split="test", seed=0))
    assert m_sasrec["n_users"] == 30
    assert m_sasrec["hr@5"] >= 0.9
    assert m_sasrec["hr@5"] >= m_pop["hr@5"] + 0.4
    assert m_sasrec["hr@5"] >= m_rand["hr@5"] + 0.4
    assert m_sasrec["auc"] >= 0.9


def test_sasrec_is_deterministic_and_leaves_global_rng_alone():
    sequences, candidates = _synthetic(n_users=80)
    cfg = SASRecConfig(hidden=16, epochs=2, seed=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sasrec_scores(sequences, candidates, split="val", cfg=cfg)
    assert torch.rand(1) == before  # the caller's RNG stream is untouched
    b = sasrec_scores(sequences, candidates, split="val", cfg=cfg)
    c = sasrec_scores(
        sequences, candidates, split="val", cfg=SASRecConfig(hidden=16, epochs=2, seed=4)
    )
    assert a.equals(b)
    assert not np.allclose(a["score"].to_numpy(), c["score"].to_numpy())


def test_sasrec_training_loss_falls_and_unknown_items_share_a_score():
    sequences, _ = _synthetic(n_users=120)
    train = [
        h + [t]
        for h, t, s in zip(*(sequences[c].to_pylist() for c in ("history", "target", "split")))
        if s == "train"
    ]
    fitted = fit_sasrec(train, SASRecConfig(hidden=16, epochs=5, seed=0))
    assert len(fitted.losses) == 5 and fitted.losses[-1] < fitted.losses[0]
    # Items never seen in training map to the one out-of-vocabulary index -> identical scores.
    s = fitted.score([["i1", "i2"], []], [["zz1", "zz2", "i3"], ["zz1", "zz2", "i3"]])
    assert s.shape == (2, 3)
    assert s[0, 0] == s[0, 1] and s[1, 0] == s[1, 1]
    assert np.isfinite(s).all()


def test_title_similarity_matches_a_hand_computed_tfidf_cosine():
    import math

    from mllm_msr.baselines.title_similarity import title_similarity_scores, words

    titles = {"a": "Red cat", "b": "blue dog", "c": "red car!", "d": "green tree", "e": "cat video"}
    items = pa.table({"item_id": list(titles), "title": list(titles.values())})
    got = title_similarity_scores(HAND_SEQUENCES, HAND_CANDIDATES, items, "test")
    assert got["item_id"].to_pylist() == ["e", "a", "d"]
    # idf = log(5 / (1 + df)): red and cat occur in 2 titles, every other word in 1.
    rare, common = math.log(5 / 2), math.log(5 / 3)
    profile = math.sqrt(common**2 + 3 * rare**2)  # t1's history c + d: red car green tree
    expected = [0.0, common / math.sqrt(2) / profile, 2 * rare / math.sqrt(2) / profile]
    np.testing.assert_allclose(got["score"].to_numpy(), expected, rtol=1e-12)
    assert words("Red_car, 红色 #2") == ["red", "car", "红色", "2"]
