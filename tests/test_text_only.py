"""Text-only recommender path (``train.multimodal: false``, a text LLM such as SmolLM2).

Fast tests on the tiny text Qwen2: the processor a text model gets is its tokenizer; prompts carry
no image; labels cover only the answer; scores match an independent forward pass; scoring with a
shared per-user prefix cache (``evaluate.share_prefix``) gives the plain scores. The slow test
fine-tunes the tiny text model with Ray Train + ZeRO-2 + LoRA on toy tables (the loss falls)
and scores the exported adapter through the evaluate stage's scorer, plain and prefix-shared.
Whether fine-tuning helps ranking is measured on real data by bench/quality_microlens.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_msr.config import TrainConfig, load_config
from mllm_msr.recommender.collate import IGNORE_INDEX, RecommenderCollator
from mllm_msr.recommender.score import YesNoScorer
from mllm_msr.tiny import default_cache_dir, resolve_model

ROOT = Path(__file__).resolve().parent.parent
TEXT_TRAIN = TrainConfig(
    model="tiny:qwen2", family="qwen2", multimodal=False, max_length=256, image_size=56
)


@pytest.fixture(scope="module")
def tiny_text() -> str:
    return resolve_model("tiny:qwen2", cache_dir=default_cache_dir())


def _rows(users: int = 2, per_user: int = 5) -> list[dict]:
    colors = ["red", "blue", "green", "pink", "gold", "navy"]
    return [
        {
            "user_id": f"u{u}",
            "item_id": f"i{u}-{k}",
            "label": int(k == 0),
            "preference": f"The user appears to have a preference for {colors[u]} games.",
            "title": f"a {colors[(u + k) % 6]} {['ball', 'kite', 'box', 'lamp', 'hat'][k % 5]}",
            "summary": "" if k % 2 else f"A {colors[k % 6]} toy.",
            "image": b"not an image: never decoded by a text-only model",
        }
        for u in range(users)
        for k in range(per_user)
    ]


def test_text_model_gets_a_tokenizer_and_answer_only_labels(tiny_text):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_text)  # what the training workers load
    collator = RecommenderCollator(processor, max_length=256, image_size=56, with_image=True)
    assert not collator.with_image  # a text-only model never receives the image
    batch = collator([{**r, "label": r["label"]} for r in _rows(1, 2)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    tok = collator.tokenizer
    for row in range(2):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tok.decode(supervised) == ("Yes" if row == 0 else "No")
    text = tok.decode(batch["input_ids"][0])
    assert "<|vision_start|>" not in text and "image" not in text.split("assistant")[0].lower()
    assert "a red ball" in text


@pytest.mark.parametrize("style", ["paper", "summary", "history"])
def test_training_and_scoring_build_the_same_prompt_for_each_prompt_choice(tiny_text, style):
    """The scorer reads the position the training collator supervises, on the same token ids,
    for every ``train.prompt``; each choice shows what it promises and nothing else."""
    import dataclasses

    from mllm_msr import families
    from mllm_msr.recommender.collate import recommender_collator

    train = dataclasses.replace(TEXT_TRAIN, prompt=style, prompt_history=2)
    fam = families.resolve(tiny_text, train.family)
    trainer_side = recommender_collator(families.load_processor(tiny_text, fam), train, fam)
    scorer = YesNoScorer("tiny:qwen2", None, train, share_prefix=style == "history")
    history = ["an old kite", "a green frog", "a blue car"]
    rows = [{**r, "history_titles": history} for r in _rows(1, 3)]
    scores = scorer.score_rows(rows)
    for row, score in zip(rows, scores):
        enc = trainer_side.encode(row)
        n_prompt = int((enc["labels"][0] != IGNORE_INDEX).nonzero()[0, 0])
        prompt_ids = enc["input_ids"][:, :n_prompt]
        assert torch.equal(prompt_ids, scorer.collator.encode(row)["input_ids"][:, :n_prompt])
        text = trainer_side.tokenizer.decode(prompt_ids[0])
        if row["summary"]:
            assert (row["summary"] in text) == (style == "summary")
        assert ("a green frog" in text) == (style == "history")
        assert "an old kite" not in text  # prompt_history=2 keeps the two most recent
        with torch.inference_mode():
            logits = scorer.model(input_ids=prompt_ids).logits[0, -1].float()
        pair = torch.softmax(torch.stack([logits[scorer.yes_id], logits[scorer.no_id]]), 0)
        assert score == pytest.approx(pair[0].item(), abs=1e-5)


def test_text_only_scores_match_a_forward_pass_and_prefix_sharing(tiny_text):
    scorer = YesNoScorer("tiny:qwen2", None, TEXT_TRAIN, micro_batch=3)
    rows = _rows(2, 5)
    plain = scorer.score_rows(rows)
    assert plain.shape == (10,) and np.all((plain > 0) & (plain < 1))
    assert len(np.unique(plain)) > 1
    # independent forward pass of the prompt alone, last position
    for row, score in zip(rows[:3], plain[:3]):
        fields = {k: row[k] for k in ("preference", "title", "summary")}
        enc = scorer.collator._encode_prompt(fields, None)
        with torch.inference_mode():
            logits = scorer.model(**enc).logits[0, -1].float()
        pair = torch.stack([logits[scorer.yes_id], logits[scorer.no_id]])
        assert score == pytest.approx(torch.softmax(pair, 0)[0].item(), abs=1e-5)
    shared = YesNoScorer("tiny:qwen2", None, TEXT_TRAIN, micro_batch=3, share_prefix=True)
    np.testing.assert_allclose(shared.score_rows(rows), plain, atol=1e-5)
    # a user's rows split over two calls, or interleaved users, still score the same
    np.testing.assert_allclose(shared.score_rows(rows[:4]), plain[:4], atol=1e-5)
    order = [0, 5, 1, 6, 2]
    np.testing.assert_allclose(shared.score_rows([rows[i] for i in order]), plain[order], atol=1e-5)


@pytest.mark.slow
def test_text_only_lora_training_and_scoring(ray_local, tmp_path, tiny_text):
    from test_train import toy_tables  # tests/ is on sys.path (pytest's rootdir-less import)

    from mllm_msr.runtime import RunDir
    from mllm_msr.stages.train import run_train

    run = RunDir(str(tmp_path / "run"))
    for name, table in toy_tables(n_users=18).items():
        run.write_table(name, table)
    cfg = load_config(
        ROOT / "configs" / "demo-cpu.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            f"cache_dir={default_cache_dir()}",
            "train.model=tiny:qwen2",
            "train.family=qwen2",
            "train.multimodal=false",
            "train.zero.stage=2",
            "train.num_workers=2",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=2",
            "train.learning_rate=0.01",
            "train.max_length=256",
            "train.max_steps=12",
            "train.checkpoint_every=100",
            "train.eval_samples=4",
        ],
    )
    summary = run_train(cfg, run)
    assert summary["steps"] == 12 and summary["without_image"] == 0  # images present, unused
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < losses[0], losses
    assert summary["frozen_unchanged"] is True
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()

    rows = [
        {
            "user_id": "v",
            "item_id": name,
            "label": int(name == "Red"),
            "preference": "The user appears to have a preference for red.",
            "title": f"{name} 9",
            "summary": f"A {name.lower()} cover.",
            "image": None,
        }
        for name in ("Red", "Blue")
    ]
    base = YesNoScorer("tiny:qwen2", None, cfg.train).score_rows(rows)
    tuned = YesNoScorer("tiny:qwen2", str(adapter), cfg.train).score_rows(rows)
    shared = YesNoScorer("tiny:qwen2", str(adapter), cfg.train, share_prefix=True)
    assert not np.allclose(base, tuned, atol=1e-3)  # the adapter is applied when scoring
    # the prefix cache path goes through the peft-wrapped model unchanged
    np.testing.assert_allclose(shared.score_rows(rows), tuned, atol=1e-5)


def test_history_prompt_drops_its_oldest_titles_before_cutting_the_preference(tiny_text):
    import dataclasses

    from mllm_msr import families
    from mllm_msr.recommender.collate import recommender_collator

    fam = families.resolve(tiny_text, "qwen2")
    processor = families.load_processor(tiny_text, fam)
    history = [f"title number {i} " + "with many words " * 6 for i in range(5)]
    row = {**_rows(1, 1)[0], "history_titles": history}
    roomy = dataclasses.replace(TEXT_TRAIN, prompt="history", max_length=2048)
    full = recommender_collator(processor, roomy, fam).encode(row)["input_ids"].shape[1]
    tight = recommender_collator(processor, dataclasses.replace(roomy, max_length=full - 20), fam)
    enc = tight.encode(row)
    text = tight.tokenizer.decode(enc["input_ids"][0])
    assert enc["input_ids"].shape[1] <= full - 20 and tight.shortened == 1
    assert "title number 0" not in text and "title number 4" in text
    assert row["preference"] in text  # the preference is not cut while titles remain
