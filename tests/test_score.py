"""Yes/No scoring reads the position the training loss supervises, in fp32, per sample."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_msr.config import TrainConfig
from mllm_msr.data.demo import draw_item_image
from mllm_msr.stages.evaluate import select_users
from mllm_msr.stages.score import YesNoScorer


@pytest.fixture(scope="module")
def scorer():
    return YesNoScorer("tiny:qwen2-vl", None, TrainConfig(max_length=512, image_size=56))


def _rows():
    return [
        {
            "user_id": "u1",
            "item_id": f"i{k}",
            "label": k % 2,
            "preference": f"likes {c}",
            "title": f"a {c} square",
            "summary": "",
            "image": draw_item_image(k, seed=0),
        }
        for k, c in enumerate(["red", "blue", "green"])
    ]


def test_scores_match_an_independent_forward_pass(scorer):
    import torch

    rows = _rows()
    got = scorer.score_rows(rows)
    assert got.shape == (3,) and np.all((got > 0) & (got < 1))
    for row, score in zip(rows, got):
        # Encode the prompt alone (no answer appended) and read the last position.
        enc = scorer.collator._encode_prompt(
            {k: row[k] for k in ("preference", "title", "summary")},
            __import__("mllm_msr.stages.collate", fromlist=["load_image"]).load_image(
                row["image"], scorer.collator.side
            ),
        )
        with torch.inference_mode():
            logits = scorer.model(**enc).logits[0, -1].float()
        pair = torch.stack([logits[scorer.yes_id], logits[scorer.no_id]])
        expected = torch.softmax(pair, 0)[0].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_batching_does_not_change_scores(scorer):
    rows = _rows()
    together = scorer.score_rows(rows)
    alone = np.concatenate([scorer.score_rows([r]) for r in rows])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_select_users_is_seeded_and_complete_groups():
    import pyarrow as pa

    users = [f"u{i}" for i in range(10) for _ in range(3)]
    cand = pa.table(
        {
            "user_id": users,
            "split": ["test"] * 30,
            "item_id": [f"i{j}" for j in range(30)],
            "label": [1, 0, 0] * 10,
        }
    )
    a = select_users(cand, "test", 4, seed=1)
    b = select_users(cand, "test", 4, seed=1)
    assert a.equals(b)
    assert len(set(a["user_id"].to_pylist())) == 4 and a.num_rows == 12
    assert select_users(cand, "test", -1, seed=1).num_rows == 30
    with pytest.raises(ValueError, match="no candidates"):
        select_users(cand, "val", -1, seed=1)
