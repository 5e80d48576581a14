"""Title-similarity baseline: how close a candidate's title is to the titles of the user's history.

A content-only reference with nothing to train: every title becomes a TF-IDF vector over its
lower-cased alphanumeric words (sublinear term frequency ``1 + log tf``, IDF over the titles of
all items, ``log(N / (1 + df))``); a user's profile is the TF-IDF vector of the words of all their
history titles together, and a candidate's score is the cosine of its title vector with that
profile. It measures how much of the task the title text alone can carry, which is the signal a
text-only recommender (an LLM reading a preference summary and a candidate title) can use.

Candidates sharing no word with the history score 0; ties are ranked pessimistically by
:mod:`mllm_msr.metrics`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pyarrow as pa

from mllm_msr.baselines.common import scores_table, split_candidates, split_histories

METHOD = "title_similarity"
_WORD = re.compile(r"[^\W_]+")


def words(text: str | None) -> list[str]:
    """Lower-cased alphanumeric words (any script) of ``text``."""
    return _WORD.findall((text or "").lower())


def _vector(tokens: list[str], idf: dict[str, float]) -> dict[str, float]:
    weights = {
        w: (1.0 + math.log(n)) * idf[w] for w, n in Counter(tokens).items() if idf.get(w, 0) > 0
    }
    norm = math.sqrt(sum(x * x for x in weights.values()))
    return {w: x / norm for w, x in weights.items()} if norm > 0 else {}


def title_similarity_scores(
    sequences: pa.Table, candidates: pa.Table, items: pa.Table, split: str = "test"
) -> pa.Table:
    """Score the ``split`` candidates by title similarity to the history; a SCORES table."""
    titles = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))
    df: Counter[str] = Counter()
    for title in titles.values():
        df.update(set(words(title)))
    idf = {w: math.log(len(titles) / (1 + n)) for w, n in df.items()}
    rows = split_candidates(candidates, split)
    histories = split_histories(sequences, split)
    profiles: dict[str, dict[str, float]] = {}
    score = np.zeros(rows.num_rows, dtype=np.float64)
    for k, (user, item) in enumerate(zip(rows["user_id"].to_pylist(), rows["item_id"].to_pylist())):
        if user not in profiles:
            history = histories.get(user, [])
            profiles[user] = _vector([w for i in history for w in words(titles.get(i))], idf)
        profile = profiles[user]
        vec = _vector(words(titles.get(item)), idf)
        score[k] = sum(x * profile.get(w, 0.0) for w, x in vec.items())
    return scores_table(rows, score, method=METHOD)
