"""Yes/No scoring reads the position the training loss supervises, in fp32, per sample."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_msr.config import TrainConfig
from mllm_msr.data.demo import draw_item_image
from mllm_msr.recommender.score import YesNoScorer
from mllm_msr.stages.evaluate import select_users


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
            __import__("mllm_msr.recommender.collate", fromlist=["load_image"]).load_image(
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


@pytest.mark.parametrize("model", ["tiny:qwen2-vl", "tiny:qwen2"])
def test_answer_loss_equals_the_models_own_loss(model):
    """Training's answer-only loss (logits only where the next token is supervised) is the
    model's full causal-LM loss, value and gradient."""
    import torch

    from mllm_msr.recommender.collate import RecommenderCollator
    from mllm_msr.recommender.score import load_processor, load_recommender
    from mllm_msr.recommender.train_loop import answer_loss
    from mllm_msr.tiny import resolve_model

    path = resolve_model(model)
    torch.manual_seed(0)
    net = load_recommender(path, None)
    multimodal = model.endswith("-vl")
    collator = RecommenderCollator(load_processor(path), 512, 56, with_image=multimodal)
    rows = [{**r, "title": r["title"] * (1 + i)} for i, r in enumerate(_rows())]  # ragged
    batch = collator(rows)
    full = net(**batch).loss
    (g_full,) = torch.autograd.grad(full, [net.get_input_embeddings().weight])
    ours = answer_loss(net, batch)
    (g_ours,) = torch.autograd.grad(ours, [net.get_input_embeddings().weight])
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    # float32 rounding grows with the magnitudes summed, so the absolute tolerance scales with
    # the gradient: a fixed atol=1e-6 failed on an AMD EPYC (1 of 76,288 elements off by 2.9e-6,
    # max |gradient| ~6.6). A wrong loss (another position, prompt tokens) differs by O(max).
    scale = g_full.abs().max().item()
    torch.testing.assert_close(g_ours, g_full, rtol=1e-4, atol=1e-4 * scale)
    assert ((g_ours - g_full).norm() / g_full.norm()).item() < 1e-4


def test_a_base_model_on_s3_is_synced_into_the_given_node_cache(scorer, s3_server, tmp_path):
    import uuid

    from mllm_msr.model_source import downloads, publish_models
    from mllm_msr.tiny import resolve_model

    uri = f"s3://{s3_server['bucket']}/models/{uuid.uuid4().hex[:8]}/qwen2-vl"
    publish_models(resolve_model("tiny:qwen2-vl"), uri)
    train = TrainConfig(max_length=512, image_size=56)
    synced = YesNoScorer(uri, None, train, cache_dir=str(tmp_path))
    assert len(downloads(uri, tmp_path)) == 1  # into the node cache it was given
    rows = _rows()
    np.testing.assert_allclose(synced.score_rows(rows), scorer.score_rows(rows), rtol=0, atol=1e-6)
