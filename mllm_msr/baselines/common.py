"""Shared plumbing of the baselines: select a split's candidates, read training sequences,
and build the SCORES table every method returns (so all methods share one evaluation harness).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_msr.data.schema import CANDIDATES, SCORES, SEQUENCES, check_columns


def split_candidates(candidates: pa.Table, split: str) -> pa.Table:
    """The candidate rows of ``split`` (``test`` or ``val``), in their input order."""
    check_columns(candidates, CANDIDATES, "candidates")
    rows = candidates.filter(pc.equal(candidates["split"], split))
    if rows.num_rows == 0:
        raise ValueError(f"no candidates for split {split!r}")
    return rows


def training_sequences(sequences: pa.Table) -> list[list[str]]:
    """Each training user's chronological sequence: ``history + [target]``.

    Only rows of split ``train`` are used; validation and test targets never enter training.
    """
    check_columns(sequences, SEQUENCES, "sequences")
    train = sequences.filter(pc.equal(sequences["split"], "train"))
    histories = train["history"].to_pylist()
    targets = train["target"].to_pylist()
    return [list(h or []) + [t] for h, t in zip(histories, targets)]


def split_histories(sequences: pa.Table, split: str) -> dict[str, list[str]]:
    """``{user_id: history}`` for the users of ``split`` (the model's input at scoring time)."""
    check_columns(sequences, SEQUENCES, "sequences")
    rows = sequences.filter(pc.equal(sequences["split"], split))
    return {
        u: list(h or []) for u, h in zip(rows["user_id"].to_pylist(), rows["history"].to_pylist())
    }


def scores_table(candidates: pa.Table, score: np.ndarray, method: str) -> pa.Table:
    """A SCORES table: the candidates' user, item and label with ``score`` and ``method``."""
    score = np.asarray(score, dtype=np.float64)
    if len(score) != candidates.num_rows:
        raise ValueError(f"{len(score)} scores for {candidates.num_rows} candidates")
    return pa.table(
        {
            "user_id": candidates["user_id"].cast(pa.string()),
            "item_id": candidates["item_id"].cast(pa.string()),
            "label": candidates["label"].cast(pa.int8()),
            "score": pa.array(score, pa.float64()),
            "method": pa.array([method] * len(score), pa.string()),
        },
        schema=SCORES,
    )


def random_scores(
    sequences: pa.Table, candidates: pa.Table, split: str = "test", seed: int = 0
) -> pa.Table:
    """Uniform random scores (seeded): the chance level of every metric (HR@k ≈ k / 21)."""
    del sequences  # same signature as the other baselines; nothing to learn
    rows = split_candidates(candidates, split)
    rng = np.random.default_rng(seed)
    return scores_table(rows, rng.random(rows.num_rows), method="random")
