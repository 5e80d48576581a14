"""Popularity baseline: a candidate's score is how often it occurs in the training data.

What counts: every item of every *training* user's sequence, i.e. its history and its target
(the rows of split ``train`` of the SEQUENCES table). Validation and test targets never count
(that would leak the answer). With ``include_eval_histories=True`` the histories (not the
targets) of the evaluated split's users count too: they are the model's input at test time, so
this is not leakage, but it makes the baseline transductive; it is off by default.

Histories in SEQUENCES hold every item before the target (or the most recent
``prepare.max_history`` when a cap is set), so counts cover those items. Items never seen score 0; ties (many items
share a count) are ranked pessimistically by :mod:`mllm_msr.metrics`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from mllm_msr.baselines.common import (
    scores_table,
    split_candidates,
    split_histories,
    training_sequences,
)

METHOD = "popularity"


def item_counts(
    sequences: pa.Table, split: str = "test", include_eval_histories: bool = False
) -> Counter[str]:
    """Interaction count per item (see the module docstring for what counts)."""
    counts: Counter[str] = Counter()
    for seq in training_sequences(sequences):
        counts.update(seq)
    if include_eval_histories:
        for history in split_histories(sequences, split).values():
            counts.update(history)
    return counts


def popularity_scores(
    sequences: pa.Table,
    candidates: pa.Table,
    split: str = "test",
    include_eval_histories: bool = False,
) -> pa.Table:
    """Score the ``split`` candidates by training popularity; returns a SCORES table."""
    counts = item_counts(sequences, split, include_eval_histories)
    rows = split_candidates(candidates, split)
    score = np.array([counts.get(i, 0) for i in rows["item_id"].to_pylist()], dtype=np.float64)
    return scores_table(rows, score, method=METHOD)
