"""The vLLM adapter on the real engine with the tiny offline models (CPU).

One engine per class (started once, closed at the end of the class): the tiny Qwen2-VL and the
tiny LLaVA for images, the tiny Qwen2 for text. Yes/No scores, with and without a LoRA adapter,
are checked against a transformers + peft forward pass.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm_msr import prompts
from mllm_msr.config import EngineConfig, SamplingConfig

pytestmark = pytest.mark.slow

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _images() -> list[Image.Image]:
    red = Image.new("RGB", (448, 448), (220, 20, 20))
    stripes = Image.new("RGB", (448, 300), (20, 20, 220))
    for x in range(0, 448, 32):
        stripes.paste((240, 240, 240), (x, 0, x + 12, 300))
    return [red, stripes]


def _random_lora(model_cls, path, out):
    """A random (non-zero) LoRA adapter on q/v projections, saved for vLLM; and the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = model_cls.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, lora).eval()
    model.save_pretrained(out)
    return model, out


def _check_scores(model, batch, yes, no, got_base, got_tuned):
    """The engine's scores equal a transformers forward pass, with and without the adapter."""
    with torch.no_grad():
        tuned = model(**batch).logits[0, -1]
        with model.disable_adapter():
            base = model(**batch).logits[0, -1]
    assert got_base == pytest.approx(torch.sigmoid(base[yes] - base[no]).item(), abs=1e-4)
    assert got_tuned == pytest.approx(torch.sigmoid(tuned[yes] - tuned[no]).item(), abs=1e-4)
    assert got_base != got_tuned


class TestVisionLanguage:
    @pytest.fixture(scope="class")
    def engine(self, cache_dir):
        from mllm_msr.engines.vllm import VLLMEngine

        cfg = EngineConfig(
            model="tiny:qwen2-vl",
            family="qwen2_vl",
            dtype="float32",
            max_model_len=1024,
            enable_lora=True,
            max_lora_rank=8,
        )
        engine = VLLMEngine(cfg, cache_dir=cache_dir)
        yield engine
        engine.close()

    def test_outputs_differ_per_image_and_count_image_tokens(self, engine):
        red, stripes = _images()
        chats = [prompts.item_summary_messages(img, "Demo item") for img in (red, stripes)]
        text_only = prompts.text_only(chats[0])
        out = engine.generate([*chats, text_only], GREEDY)
        assert all(o.output_tokens > 0 and o.text for o in out)
        assert out[0].text != out[1].text
        # 448x448 -> 16x16 patches of 14 px (under max_pixels 224*224), merged 2x2: 64 tokens,
        # plus <|vision_start|> and <|vision_end|>.
        assert out[0].prompt_tokens == out[2].prompt_tokens + 64 + 2
        assert out[2].prompt_tokens < out[1].prompt_tokens < out[0].prompt_tokens

    def test_greedy_is_deterministic_and_sampling_is_seeded(self, engine):
        chat = prompts.item_summary_messages(_images()[0], "Demo item")
        first = engine.generate([chat, chat], GREEDY)
        assert first[0].text == first[1].text == engine.generate([chat], GREEDY)[0].text
        sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3)
        a = engine.generate([chat], sampled)[0].text
        assert engine.generate([chat], sampled)[0].text == a

    def test_image_bytes_and_yes_no_scores(self, engine):
        import io

        buf = io.BytesIO()
        _images()[1].save(buf, format="PNG")
        chats = [
            prompts.recommender_messages("likes red things", "Red ball", image=img)
            for img in (_images()[0], buf.getvalue())
        ]
        scores = engine.score_yes_no(chats)
        assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)
        assert scores[0] != scores[1]

    def test_bad_requests_are_skipped_when_asked(self, engine):
        good = prompts.item_summary_messages(_images()[0], "Demo item")
        too_long = prompts.user_text("red blue " * 1000)  # > max_model_len tokens
        with pytest.raises(Exception, match="maximum context length"):
            engine.generate([good, too_long], GREEDY)
        out = engine.generate([good, too_long], GREEDY, on_error="skip")
        assert out[0].finish_reason in ("stop", "length") and out[0].text
        assert out[1].finish_reason == "error" and out[1].error and out[1].text == ""
        scores = engine.score_yes_no([good, too_long, good], on_error="skip")
        assert 0.0 < scores[0] < 1.0 and scores[1] != scores[1] and scores[2] == scores[0]

    def test_lora_scores_with_images_match_transformers(self, engine, tmp_path):
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        model, adapter = _random_lora(Qwen2VLForConditionalGeneration, engine.model_path, tmp_path)
        processor = AutoProcessor.from_pretrained(engine.model_path)
        images = _images()
        chats = [prompts.recommender_messages("likes red", "Red ball", image=i) for i in images]
        base = engine.score_yes_no(chats)
        tuned = engine.score_yes_no(chats, lora_path=adapter)
        yes, no = engine.answer_token_ids()
        for chat, image, got_base, got_tuned in zip(chats, images, base, tuned):
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            batch = processor(text=[text], images=[image], return_tensors="pt")
            _check_scores(model, batch, yes, no, got_base, got_tuned)


class TestLlava:
    @pytest.fixture(scope="class")
    def engine(self, cache_dir):
        from mllm_msr.engines.vllm import VLLMEngine

        cfg = EngineConfig(model="tiny:llava", family="llava", dtype="float32", max_model_len=1024)
        engine = VLLMEngine(cfg, cache_dir=cache_dir)
        yield engine
        engine.close()

    def test_generates_per_image_and_scores(self, engine):
        chats = [prompts.item_summary_messages(img, "Demo [INST] item") for img in _images()]
        out = engine.generate([*chats, prompts.text_only(chats[0])], GREEDY)
        assert out[0].text != out[1].text
        # Fixed 112x112 input: 8x8 patches -> 64 image tokens, plus the newline after <image>.
        assert out[0].prompt_tokens == out[1].prompt_tokens == out[2].prompt_tokens + 64 + 1
        scores = engine.score_yes_no([prompts.recommender_messages("p", "t", image=_images()[0])])
        assert 0.0 < scores[0] < 1.0


class TestTextLLM:
    @pytest.fixture(scope="class")
    def engine(self, cache_dir):
        from mllm_msr.engines.vllm import VLLMEngine

        cfg = EngineConfig(
            model="tiny:qwen2",
            family="qwen2",
            dtype="float32",
            max_model_len=1024,
            enable_lora=True,
            max_lora_rank=8,
        )
        engine = VLLMEngine(cfg, cache_dir=cache_dir)
        yield engine
        engine.close()

    def test_text_llm_generates(self, engine):
        history = [{"title": "Red circle", "summary": "a red circle"}, {"title": "Blue square"}]
        chats = [
            prompts.preference_messages(None, history),
            prompts.preference_messages("likes red", history),
        ]
        out = engine.generate(chats, GREEDY)
        assert all(o.text and o.output_tokens == GREEDY.max_new_tokens for o in out)
        assert out[1].prompt_tokens > out[0].prompt_tokens

    def test_stream_answers_like_generate_and_skips_refused_requests(self, engine):
        """Continuous feeding: requests submitted while others run give generate's answers
        (greedy, and sampled with the same per-request seed); a refused request comes back as
        an error Generation with on_error="skip" and raises with "raise"."""
        history = [{"title": "Red circle", "summary": "a red circle"}, {"title": "Blue square"}]
        chats = [prompts.preference_messages(p, history) for p in (None, "likes red", "x y z")]
        too_long = prompts.user_text("red blue " * 1000)  # > max_model_len tokens
        sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3)
        for sampling in (GREEDY, sampled):
            want = engine.generate(chats, sampling, seeds=[11, 12, 13])
            stream = engine.stream(sampling, on_error="skip")
            stream.submit("a", chats[0], seed=11)
            got = dict(stream.step())  # one step: the first request runs, then others join
            stream.submit("bad", too_long, seed=0)
            stream.submit("b", chats[1], seed=12)
            stream.submit("c", chats[2], seed=13)
            while stream.in_flight:
                got.update(stream.step())
            assert [got[k].text for k in "abc"] == [w.text for w in want]
            assert got["bad"].finish_reason == "error" and got["bad"].text == ""
            assert stream.steps >= GREEDY.max_new_tokens and stream.submitted == 4
        strict = engine.stream(GREEDY)
        with pytest.raises(Exception, match="maximum context length"):
            strict.submit("bad", too_long)
        assert engine.llm.llm_engine.get_num_unfinished_requests() == 0

    def test_any_thread_may_call_the_engine(self, engine):
        """The engine computes on its own thread whichever thread calls it. Ray Data builds a
        callable class on the actor's main thread and calls it from another: computing on the
        caller's thread gave the process a second OpenMP team (one more worker thread per
        extra engine thread), whose sleeping and waking slowed every step."""
        import os
        import threading

        chats = [prompts.preference_messages(None, [{"title": "Red circle"}])]
        want = [g.text for g in engine.generate(chats, GREEDY)]
        assert engine.torch_threads() == engine.cpu_threads
        got: dict = {}
        done, counted = threading.Event(), threading.Event()

        def caller() -> None:
            try:
                got["texts"] = [g.text for g in engine.generate(chats, GREEDY)]
                stream = engine.stream(GREEDY)
                stream.submit("a", chats[0])
                while stream.in_flight:
                    got.update(stream.step())
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                got["error"] = exc
            done.set()
            counted.wait(60)  # alive while the threads are counted

        before = len(os.listdir("/proc/self/task"))
        t = threading.Thread(target=caller)
        t.start()
        done.wait(120)
        new_threads = len(os.listdir("/proc/self/task")) - before - 1  # less the caller
        counted.set()
        t.join(timeout=60)
        assert "error" not in got and got["texts"] == want and got["a"].text == want[0]
        assert new_threads == 0  # no OpenMP team of the caller's

    def test_yes_no_scores_match_transformers(self, engine, tmp_path):
        from transformers import AutoModelForCausalLM

        model, adapter = _random_lora(AutoModelForCausalLM, engine.model_path, tmp_path)
        chats = [
            prompts.recommender_messages("likes red things", title, with_image=False)
            for title in ("Red ball", "Blue kite", "Green hat")
        ]
        base = engine.score_yes_no(chats)
        tuned = engine.score_yes_no(chats, lora_path=adapter)
        assert all(0.0 < s < 1.0 for s in base + tuned)
        assert engine.score_yes_no(chats[1:2]) == pytest.approx(base[1:2], abs=1e-5)
        yes, no = engine.answer_token_ids()
        tok = engine.tokenizer
        for chat, got_base, got_tuned in zip(chats, base, tuned):
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            _check_scores(model, {"input_ids": ids}, yes, no, got_base, got_tuned)


@pytest.mark.timeout(300)
def test_vllm_scorer_matches_the_transformers_scorer_on_collator_token_ids(tmp_path):
    """``evaluate.engine: vllm`` scores the collator's token ids with the LoRA adapter: the
    same scores as the transformers scorer (fp32) and the same ranking metrics."""
    import numpy as np
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from mllm_msr.config import EvaluateConfig, TrainConfig
    from mllm_msr.metrics import evaluate_scores
    from mllm_msr.recommender.score import VLLMYesNoScorer, YesNoScorer
    from mllm_msr.tiny import resolve_model

    train = TrainConfig(
        model="tiny:qwen2", family="qwen2", multimodal=False, max_length=256, prompt="history"
    )
    _, adapter = _random_lora(AutoModelForCausalLM, resolve_model("tiny:qwen2"), tmp_path / "a")
    colors = ["red", "blue", "green", "gold", "pink"]
    rows = [
        {
            "user_id": f"u{u}",
            "item_id": f"i{u}-{k}",
            "label": int(k == u % 5),
            "preference": f"The user appears to have a preference for {colors[u]} things.",
            "title": f"a {colors[k]} {['ball', 'kite', 'box'][(u + k) % 3]}",
            "summary": "",
            "history_titles": [f"a {colors[(u + j) % 5]} hat" for j in range(u + 1)],
        }
        for u in range(4)
        for k in range(5)
    ]
    want = YesNoScorer("tiny:qwen2", str(adapter), train).score_rows(rows)
    scorer = VLLMYesNoScorer("tiny:qwen2", str(adapter), train, EvaluateConfig())
    try:
        got = scorer.score_rows(rows)
    finally:
        scorer.close()
    assert np.all((got > 0) & (got < 1))
    np.testing.assert_allclose(got, want, atol=1e-4)

    def table(scores):
        return pa.table(
            {
                "user_id": [r["user_id"] for r in rows],
                "item_id": [r["item_id"] for r in rows],
                "label": [r["label"] for r in rows],
                "score": scores,
            }
        )

    a, b = evaluate_scores(table(got), ks=[1, 3]), evaluate_scores(table(want), ks=[1, 3])
    for name in ("auc", "hr@1", "hr@3", "mrr@3"):
        assert a[name] == pytest.approx(b[name], abs=1e-9), name
