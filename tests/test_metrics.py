"""Metrics against hand-computed cases (each worked out in the comments) and brute force."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from mllm_msr.metrics import (
    auc,
    bootstrap_ci,
    evaluate_methods,
    evaluate_scores,
    group_ranks,
    metric_names,
    paired_bootstrap_diff,
)
from mllm_msr.report import format_metrics_table

KS = (1, 3, 5, 10)


def _groups(*groups: tuple[float, list[float]]) -> dict[str, np.ndarray]:
    """Rows for groups given as (positive score, negative scores); users u0, u1, ..."""
    users, labels, scores = [], [], []
    for i, (pos, negs) in enumerate(groups):
        users += [f"u{i}"] * (1 + len(negs))
        labels += [1] + [0] * len(negs)
        scores += [pos] + list(negs)
    return {"user_id": np.array(users), "label": np.array(labels), "score": np.array(scores)}


def test_all_equal_scores_get_auc_half_and_rank_last():
    # 3 users x 21 candidates, every score 0.5 (an untrained model). Per group: 20 negatives tie
    # the positive -> rank = 1 + 20 = 21 (pessimistic), so HR/MRR/NDCG@k = 0 for every k <= 10.
    # AUC: every positive-negative pair is a tie -> 0.5; per-user AUC likewise 0.5.
    rows = _groups(*[(0.5, [0.5] * 20)] * 3)
    m = evaluate_scores(**rows, ks=KS)
    assert m["auc"] == 0.5
    assert m["uauc"] == 0.5
    for k in KS:
        assert m[f"hr@{k}"] == 0.0
        assert m[f"mrr@{k}"] == 0.0
        assert m[f"ndcg@{k}"] == 0.0
    assert (m["n_users"], m["n_rows"], m["n_users_skipped"]) == (3, 63, 0)
    assert m["n_candidates_per_user"] == 21.0
    assert group_ranks(**rows).rank.tolist() == [21, 21, 21]


def test_perfect_ranker():
    # Positive scores 1.0, the 20 negatives 0.0 .. 0.19: rank 1 -> HR = MRR = NDCG = 1 at every k.
    negs = [i / 100 for i in range(20)]
    m = evaluate_scores(**_groups((1.0, negs), (1.0, negs)), ks=KS)
    assert m["auc"] == 1.0 and m["uauc"] == 1.0
    for k in KS:
        assert m[f"hr@{k}"] == m[f"mrr@{k}"] == m[f"ndcg@{k}"] == 1.0


def test_worst_ranker():
    # Positive below all 20 negatives: rank 21 -> every ranking metric 0; AUC 0.
    negs = [0.5 + i / 100 for i in range(20)]
    m = evaluate_scores(**_groups((0.0, negs), (0.1, negs)), ks=KS)
    assert m["auc"] == 0.0 and m["uauc"] == 0.0
    for k in KS:
        assert m[f"hr@{k}"] == m[f"mrr@{k}"] == m[f"ndcg@{k}"] == 0.0


def test_partial_ties_hand_computed():
    # u0: positive 0.8, negatives [0.9, 0.8, 0.5, 0.1]: above 1, tied 1, below 2
    #     rank = 1 + 1 + 1 = 3; AUC_u0 = (2 + 0.5) / 4 = 0.625
    #     HR@1 0, HR@3 1, MRR@3 1/3, NDCG@3 = 1/log2(4) = 0.5
    # u1: positive 0.3, negatives [0.2, 0.1, 0.3]: above 0, tied 1, below 2
    #     rank = 2; AUC_u1 = (2 + 0.5) / 3 = 5/6
    #     HR@1 0, HR@3 1, MRR@3 1/2, NDCG@3 = 1/log2(3)
    # All-rows AUC: 2 positives x 7 negatives = 14 pairs.
    #     pos 0.8 beats {0.5, 0.1, 0.2, 0.1, 0.3} = 5, ties {0.8} = 0.5 -> 5.5
    #     pos 0.3 beats {0.1, 0.2, 0.1} = 3, ties {0.3} = 0.5 -> 3.5
    #     AUC = 9 / 14
    rows = _groups((0.8, [0.9, 0.8, 0.5, 0.1]), (0.3, [0.2, 0.1, 0.3]))
    g = group_ranks(**rows)
    assert g.rank.tolist() == [3, 2]
    np.testing.assert_allclose(g.auc, [0.625, 5 / 6])
    m = evaluate_scores(**rows, ks=KS)
    assert m["auc"] == pytest.approx(9 / 14)
    assert m["uauc"] == pytest.approx((0.625 + 5 / 6) / 2)
    assert m["hr@1"] == 0.0 and m["mrr@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["hr@3"] == 1.0 and m["hr@5"] == 1.0
    assert m["mrr@3"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["ndcg@3"] == pytest.approx((0.5 + 1 / math.log2(3)) / 2)


def test_groups_of_21_candidates_hand_computed():
    # u0: negatives 1..20, positive 14.5 -> negatives above: 15..20 = 6 -> rank 7.
    #     HR@5 0, HR@10 1, MRR@10 1/7, NDCG@10 = 1/log2(8) = 1/3; AUC_u0 = 14/20 = 0.7
    # u1: 17 negatives at 0.0, 3 negatives tie the positive at 0.9 -> rank 1 + 3 = 4.
    #     HR@3 0, HR@5 1, MRR@5 1/4, NDCG@5 = 1/log2(5); AUC_u1 = (17 + 1.5) / 20 = 0.925
    # u2: the positive 2.0 above all -> rank 1, AUC 1.
    rows = _groups(
        (14.5, [float(i) for i in range(1, 21)]),
        (0.9, [0.0] * 17 + [0.9] * 3),
        (2.0, [1.0] * 20),
    )
    assert group_ranks(**rows).rank.tolist() == [7, 4, 1]
    m = evaluate_scores(**rows, ks=KS)
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(1 / 3)
    assert m["hr@5"] == pytest.approx(2 / 3)
    assert m["hr@10"] == 1.0
    assert m["mrr@5"] == pytest.approx((0 + 1 / 4 + 1) / 3)
    assert m["mrr@10"] == pytest.approx((1 / 7 + 1 / 4 + 1) / 3)
    assert m["ndcg@5"] == pytest.approx((0 + 1 / math.log2(5) + 1) / 3)
    assert m["ndcg@10"] == pytest.approx((1 / 3 + 1 / math.log2(5) + 1) / 3)
    assert m["uauc"] == pytest.approx((0.7 + 0.925 + 1.0) / 3)
    assert m["n_rows"] == 63 and m["n_users"] == 3


def test_matches_brute_force_on_random_tied_scores():
    rng = np.random.default_rng(0)
    n_users, n_cand = 40, 21
    user = np.repeat(np.arange(n_users).astype(str), n_cand)
    label = np.tile([1] + [0] * (n_cand - 1), n_users)
    score = rng.integers(0, 6, size=len(user)).astype(float)  # few values: many ties
    perm = rng.permutation(len(user))  # rows need not be grouped or ordered
    user, label, score = user[perm], label[perm], score[perm]

    pos, neg = score[label == 1], score[label == 0]
    brute_auc = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(label, score) == pytest.approx(brute_auc)

    g = group_ranks(user, label, score)
    for u, r in zip(g.users, g.rank):
        s, y = score[user == u], label[user == u]
        assert r == 1 + int((s[y == 0] >= s[y == 1][0]).sum())


def test_degenerate_groups_skip_or_raise():
    # u0 is a normal group; u1 has no positive; u2 has no negative.
    user = ["u0", "u0", "u1", "u1", "u2"]
    label = [1, 0, 0, 0, 1]
    score = [0.9, 0.1, 0.5, 0.4, 0.3]
    m = evaluate_scores(user_id=user, label=label, score=score)
    assert m["n_users"] == 1 and m["n_users_skipped"] == 2 and m["hr@1"] == 1.0
    # The all-rows AUC uses every row: positives {0.9, 0.3} vs negatives {0.1, 0.5, 0.4}: 4 / 6.
    assert m["auc"] == pytest.approx(4 / 6)
    g = group_ranks(user, label, score)
    assert (g.n_skipped_no_positive, g.n_skipped_no_negative) == (1, 1)
    with pytest.raises(ValueError, match="without a positive"):
        evaluate_scores(user_id=user, label=label, score=score, on_degenerate="raise")
    with pytest.raises(ValueError, match="more than one positive"):
        evaluate_scores(user_id=["a", "a"], label=[1, 1], score=[0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scores(user_id=["a", "a"], label=[1, 0], score=[float("nan"), 0.2])


def test_table_input_equals_arrays():
    rows = _groups((0.8, [0.9, 0.8, 0.5, 0.1]), (0.3, [0.2, 0.1, 0.3]))
    table = pa.table(
        {
            "user_id": rows["user_id"].tolist(),
            "item_id": [str(i) for i in range(len(rows["label"]))],
            "label": pa.array(rows["label"], pa.int8()),
            "score": rows["score"],
        }
    )
    assert evaluate_scores(table) == evaluate_scores(**rows)
    assert set(metric_names(KS)) <= set(evaluate_scores(table))


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    n_users = 60
    user = np.repeat(np.arange(n_users).astype(str), 21)
    label = np.tile([1] + [0] * 20, n_users)
    score = rng.normal(size=len(user)) + 1.0 * label
    m = evaluate_scores(user_id=user, label=label, score=score)
    ci = bootstrap_ci(user_id=user, label=label, score=score, n_boot=200, seed=3)
    for name in ("auc", "uauc", "hr@5", "mrr@5", "ndcg@5"):
        low, high = ci[name]
        assert low <= m[name] <= high and low < high
    assert ci == bootstrap_ci(user_id=user, label=label, score=score, n_boot=200, seed=3)
    perfect = bootstrap_ci(**_groups((1.0, [0.0] * 20), (1.0, [0.5] * 20)), n_boot=50)
    assert perfect["hr@1"] == (1.0, 1.0) and perfect["auc"] == (1.0, 1.0)


def test_paired_bootstrap_diff_is_zero_on_itself_and_narrower_than_separate_intervals():
    rng = np.random.default_rng(2)
    n_users = 80
    user = np.repeat(np.arange(n_users).astype(str), 21)
    label = np.tile([1] + [0] * 20, n_users)
    base = rng.normal(size=len(user))
    noise = 0.3 * rng.normal(size=len(user))

    def table(score):
        return pa.table({"user_id": user, "label": pa.array(label, pa.int8()), "score": score})

    strong, weak = table(base + 1.2 * label), table(base + noise + 0.8 * label)
    assert all(v == (0.0, 0.0, 0.0) for v in paired_bootstrap_diff(strong, strong).values())
    diff = paired_bootstrap_diff(strong, weak, n_boot=300, seed=5)
    m_s, m_w = evaluate_scores(strong), evaluate_scores(weak)
    for name in ("auc", "hr@5", "ndcg@5"):
        point, low, high = diff[name]
        assert point == pytest.approx(m_s[name] - m_w[name])
        assert low <= point <= high
    # Same users, same candidates: the paired interval is narrower than the separate ones.
    ci_s = bootstrap_ci(strong, n_boot=300, seed=5)["auc"]
    ci_w = bootstrap_ci(weak, n_boot=300, seed=5)["auc"]
    assert diff["auc"][2] - diff["auc"][1] < (ci_s[1] - ci_s[0]) + (ci_w[1] - ci_w[0])
    with pytest.raises(ValueError, match="same evaluable users"):
        paired_bootstrap_diff(strong, table(base).slice(0, 21 * 10))


def test_format_metrics_table():
    results = {
        "popularity": {"auc": 0.61234, "hr@5": 0.25, "n_users": 500},
        "sasrec": {"auc": 0.8, "hr@5": float("nan"), "n_users": 500},
    }
    md = format_metrics_table(results, metrics=["auc", "hr@5"])
    assert md.splitlines() == [
        "| method | AUC | HR@5 | users |",
        "|---|---:|---:|---:|",
        "| popularity | 61.23 | 25.00 | 500 |",
        "| sasrec | 80.00 | - | 500 |",
    ]
    text = format_metrics_table(
        results, metrics=["auc"], fmt="text", ci={"sasrec": {"auc": (0.75, 0.85)}}
    )
    assert text.splitlines() == [
        "method                       AUC  users",
        "----------  --------------------  -----",
        "popularity                 61.23    500",
        "sasrec      80.00 [75.00, 85.00]    500",
    ]
    # The default columns follow metric_names: AUC, UAUC, HR@k, MRR@k, NDCG@k.
    header = format_metrics_table({"m": {"auc": 0.5}}, ks=(1, 5)).splitlines()[0]
    assert header == "| method | AUC | UAUC | HR@1 | HR@5 | MRR@1 | MRR@5 | NDCG@1 | NDCG@5 |"


def test_evaluate_methods_splits_a_scores_table_by_method():
    # Same two-user example scored by two methods: "flat" ties everything, "good" ranks first.
    users = ["a", "a", "a", "b", "b", "b"]
    labels = [1, 0, 0, 1, 0, 0]
    table = pa.table(
        {
            "user_id": users * 2,
            "item_id": ["x"] * 12,
            "label": pa.array(labels * 2, pa.int8()),
            "score": [0.5] * 6 + [0.9, 0.1, 0.2] * 2,
            "method": ["flat"] * 6 + ["good"] * 6,
        }
    )
    result = evaluate_methods(table, ks=(1,))
    assert list(result) == ["flat", "good"]
    assert (result["flat"]["auc"], result["flat"]["hr@1"]) == (0.5, 0.0)
    assert (result["good"]["auc"], result["good"]["hr@1"]) == (1.0, 1.0)
    assert result["good"]["n_rows"] == 6
