"""Recommender fine-tuning: SFT samples, collation (label mask, truncation), Ray Train + ZeRO.

Fast tests cover sample building and collation on the tiny Qwen2-VL. The slow tests run real
Ray Train + DeepSpeed + peft with 2 CPU workers on a small learnable task (the positive candidate
is always red and titled "Red ...", the negative blue), combining scenarios to keep the number
of Ray Train runs small:

* ZeRO-2: a worker process dies (os._exit) once at step 6; the run restarts from the step-4
  checkpoint and finishes; the loss falls, the base weights stay, the adapter moves and loads
  for scoring.
* ZeRO-3 (every parameter partitioned): train 3 steps, then rerun with ``max_steps=6``: it
  resumes at step 3 and continues the step count and the loss history.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from mllm_msr.config import PipelineConfig, load_config
from mllm_msr.data import schema
from mllm_msr.prompts import answer_token_ids
from mllm_msr.recommender.collate import IGNORE_INDEX, RecommenderCollator
from mllm_msr.recommender.samples import build_sft_samples, titles_history
from mllm_msr.runtime import RunDir

# --------------------------------------------------------------------------- toy tables


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE = _png((220, 20, 20)), _png((20, 20, 220))


def toy_tables(n_users: int = 12, with_preferences: bool = True) -> dict[str, pa.Table]:
    """Users like red items: positives are red "Red k" items, negatives blue "Blue k" items.

    Every third user has no preference row (falls back to titles). Splits: users 0..n-3 train,
    the last two val.
    """
    items = {
        "item_id": [],
        "title": [],
        "text": [],
        "images": [],
        "image_hashes": [],
        "image_hash": [],
    }
    for k in range(6):
        for name, img in (("Red", RED), ("Blue", BLUE)):
            items["item_id"].append(f"{name.lower()}{k}")
            items["title"].append(f"{name} {k}")
            items["text"].append("")
            items["images"].append([img])
            items["image_hashes"].append([f"h-{name}{k}"])
            items["image_hash"].append(f"h-{name}{k}")
    seqs = {"user_id": [], "split": [], "history": [], "target": []}
    cands = {"user_id": [], "split": [], "item_id": [], "label": []}
    prefs = {
        "user_id": [],
        "consumed": [],
        "text": [],
        "is_final": [],
        "model": [],
        "prompt_version": [],
    }
    for u in range(n_users):
        user, split = f"u{u}", "train" if u < n_users - 2 else "val"
        history = [f"red{(u + j) % 6}" for j in range(3)]
        target, negative = f"red{(u + 3) % 6}", f"blue{u % 6}"
        seqs["user_id"].append(user)
        seqs["split"].append(split)
        seqs["history"].append(history)
        seqs["target"].append(target)
        for item, label in ((target, 1), (negative, 0)):
            cands["user_id"].append(user)
            cands["split"].append(split)
            cands["item_id"].append(item)
            cands["label"].append(label)
        if with_preferences and u % 3 != 2:
            for consumed, final in ((1, False), (3, True)):
                prefs["user_id"].append(user)
                prefs["consumed"].append(consumed)
                prefs["text"].append(f"The user appears to have a preference for red ({consumed}).")
                prefs["is_final"].append(final)
                prefs["model"].append("toy")
                prefs["prompt_version"].append("toy/v1")
    summaries = {
        "item_id": items["item_id"],
        "summary": [f"A {t.split()[0].lower()} cover." for t in items["title"]],
    }
    return {
        "items": pa.Table.from_pydict(items, schema=schema.ITEMS),
        "sequences": pa.Table.from_pydict(seqs, schema=schema.SEQUENCES),
        "candidates": pa.Table.from_pydict(cands, schema=schema.CANDIDATES),
        "preferences": pa.Table.from_pydict(prefs, schema=schema.PREFERENCES),
        "item_summaries": pa.table(summaries),
    }


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    from mllm_msr.tiny import resolve_model

    return resolve_model("tiny:qwen2-vl", cache_dir=_cache_dir())


def _cache_dir() -> str:
    from mllm_msr.tiny import default_cache_dir

    return str(default_cache_dir())


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vlm)


# --------------------------------------------------------------------------- SFT samples


def test_sft_samples_use_final_preference_and_fall_back_to_titles():
    t = toy_tables(n_users=6)
    samples, quarantined, stats = build_sft_samples(
        t["candidates"], t["sequences"], t["items"], t["item_summaries"], t["preferences"]
    )
    assert samples.num_rows == 12 and quarantined.num_rows == 0
    assert stats["per_split"] == {"train": 8, "val": 4}
    assert stats["positives"] == 6
    rows = {(r["user_id"], r["item_id"]): r for r in samples.to_pylist()}
    # user 0 has a final state that read its whole history (3 items); the non-final one is unused
    r = rows[("u0", "red3")]
    assert r["preference"].endswith("(3).") and r["preference_source"] == "final"
    assert r["label"] == 1 and r["title"] == "Red 3" and r["summary"] == "A red cover."
    assert r["image"] == RED
    # user 2 has no preference: titles of its history, counted
    r = rows[("u2", "blue2")]
    assert r["preference_source"] == "titles" and r["label"] == 0
    assert r["preference"] == titles_history(["Red 2", "Red 3", "Red 4"])
    assert stats["fallback_users"] == 2  # u2, u5
    # train rows come first, then val; users sorted
    assert samples.column("split").to_pylist() == ["train"] * 8 + ["val"] * 4


def test_sft_quarantines_unknown_items_and_optionally_missing_preferences():
    t = toy_tables(n_users=6)
    cands = pa.concat_tables(
        [
            t["candidates"],
            pa.Table.from_pydict(
                {"user_id": ["u0"], "split": ["train"], "item_id": ["nope"], "label": [0]},
                schema=schema.CANDIDATES,
            ),
        ]
    )
    # a stale final state (read fewer items than the history) does not count
    prefs = t["preferences"].to_pydict()
    prefs["consumed"] = [
        2 if (u == "u1" and f) else c
        for u, c, f in zip(prefs["user_id"], prefs["consumed"], prefs["is_final"])
    ]
    samples, quarantined, stats = build_sft_samples(
        cands,
        t["sequences"],
        t["items"],
        None,
        pa.Table.from_pydict(prefs, schema=schema.PREFERENCES),
        missing_preference="quarantine",
    )
    reasons = quarantined.column("reason").to_pylist()
    assert reasons.count("unknown_item") == 1
    assert reasons.count("missing_preference") == 6  # u1 (stale), u2, u5: 2 candidates each
    assert samples.num_rows + quarantined.num_rows == stats["rows_in"] == 13
    assert set(samples.column("summary").to_pylist()) == {""}


# --------------------------------------------------------------------------- collation


def _sample(
    label: int = 1, preference: str = "The user appears to have a preference for red."
) -> dict:
    return {
        "preference": preference,
        "title": "Red 1",
        "summary": "A red cover.",
        "image": RED,
        "label": label,
    }


def test_collation_fixed_image_size_and_answer_only_labels(processor):
    collator = RecommenderCollator(processor, max_length=512, image_size=112)
    batch = collator([_sample(1), _sample(0, "short"), {**_sample(1), "image": None}])
    image_id = processor.image_token_id
    n_image = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    # 112 px = 8 x 14 px patches -> 4 x 4 merged tokens, whatever the source size (64 x 48)
    assert n_image == [16, 16, 0]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert batch["mm_token_type_ids"].sum().item() == 32
    tok = processor.tokenizer
    yes, no = answer_token_ids(tok)  # the ids scoring reads
    for row, answer in zip(range(3), (yes, no, yes)):
        supervised = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(supervised) == 1  # only the answer token
        pos = supervised[0]
        assert batch["labels"][row, pos] == answer == batch["input_ids"][row, pos]
        assert batch["attention_mask"][row, pos] == 1
        assert batch["attention_mask"][row, pos + 1 :].sum() == 0  # right padding after it
        # the token before the answer ends the generation header, as at scoring time
        header = tok.decode(batch["input_ids"][row, pos - 3 : pos])
        assert "assistant" in header


def test_loss_is_the_answer_token_cross_entropy(processor, tiny_vlm):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    collator = RecommenderCollator(processor, max_length=512, image_size=112)
    batch = collator([_sample(1), _sample(0, "another preference")])
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits.float()
    ce = []
    for row in range(2):
        pos = (batch["labels"][row] != IGNORE_INDEX).nonzero().item()
        ce.append(
            torch.nn.functional.cross_entropy(
                logits[row, pos - 1][None], batch["labels"][row, pos][None]
            )
        )
    expected = torch.stack(ce).mean()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # Every prompt position is ignored, so relabelling prompt tokens (as the reference code
    # did) would change the loss: the mask is what keeps it to the answer token.
    prompt = batch["labels"] == IGNORE_INDEX
    assert prompt.sum() == batch["labels"].numel() - 2
    relabelled = torch.where(
        prompt & (batch["attention_mask"] == 1), batch["input_ids"], batch["labels"]
    )
    with torch.no_grad():
        assert not torch.allclose(model(**{**batch, "labels": relabelled}).loss, expected)


def test_truncation_shortens_preference_keeps_image_and_answer(processor):
    long_pref = "The user appears to have a preference for " + "red round shapes, " * 200
    roomy = RecommenderCollator(processor, max_length=4096, image_size=112).encode(
        _sample(1, long_pref)
    )
    collator = RecommenderCollator(processor, max_length=200, image_size=112)
    enc = collator.encode(_sample(1, long_pref))
    assert roomy["input_ids"].shape[1] > 200 >= enc["input_ids"].shape[1]
    assert collator.shortened == 1
    assert (enc["input_ids"] == processor.image_token_id).sum() == 16
    assert enc["labels"][0, -1] == processor.tokenizer.convert_tokens_to_ids("Yes")
    text = processor.tokenizer.decode(enc["input_ids"][0])
    assert "The item's title is 'Red 1'" in text and "red round shapes" in text
    # a short sample is left alone
    collator.encode(_sample(0))
    assert collator.shortened == 1
    with pytest.raises(ValueError, match="cannot hold"):
        RecommenderCollator(processor, max_length=40, image_size=112).encode(_sample(1))


def test_adapter_export_load_and_merge_agree(tmp_path, tiny_vlm, processor):
    from transformers import AutoModelForImageTextToText

    from mllm_msr.config import LoraConfig
    from mllm_msr.engines.peft import apply_lora, load_adapter, merge_adapter, save_adapter

    torch.manual_seed(0)
    tuned = apply_lora(AutoModelForImageTextToText.from_pretrained(tiny_vlm), LoraConfig(r=4))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained
    save_adapter(tuned, tmp_path / "adapter")
    batch = RecommenderCollator(processor, max_length=512, image_size=112)([_sample(1)])
    with torch.no_grad():
        expected = tuned.eval()(**batch).logits
        loaded = load_adapter(
            AutoModelForImageTextToText.from_pretrained(tiny_vlm), tmp_path / "adapter"
        )
        # absolute tolerances scale with the logits (float32 rounding grows with magnitudes)
        scale = expected.abs().max().item()
        torch.testing.assert_close(
            loaded.eval()(**batch).logits, expected, rtol=1e-5, atol=1e-5 * scale
        )
        merged_dir = merge_adapter(tiny_vlm, tmp_path / "adapter", tmp_path / "merged")
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4 * scale)
        base = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-2 * scale)


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")), ids=str
)
def test_shipped_configs_give_valid_deepspeed_configs(config):
    from mllm_msr.engines.deepspeed import build_config

    train = load_config(config).train
    ds = build_config(train, world_size=train.num_workers)
    assert ds["train_batch_size"] == (
        train.micro_batch_size * train.grad_accum_steps * train.num_workers
    )
    assert ds["zero_optimization"]["stage"] == train.zero.stage
    assert ds["bf16"]["enabled"] == (train.precision == "bf16")
    # without offload a torch AdamW is passed in: no optimizer block, so no fused_adam build
    offload = train.zero.offload_optimizer or train.zero.offload_params
    assert ("optimizer" in ds) == offload and ds.get("zero_allow_untested_optimizer") != offload


# --------------------------------------------------------------------------- LoRA


def test_lora_targets_skip_vision_unless_asked(tiny_vlm):
    from transformers import AutoModelForImageTextToText

    from mllm_msr.config import LoraConfig
    from mllm_msr.engines.peft import apply_lora, lora_target_names

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    names = lora_target_names(model, LoraConfig(target_modules=["q_proj", "v_proj", "qkv"]))
    assert names and all("language_model" in n and n.endswith(("q_proj", "v_proj")) for n in names)
    with_vision = lora_target_names(model, LoraConfig(train_vision=True))
    assert any(".visual.merger." in n for n in with_vision)
    assert any(".visual.blocks." in n for n in with_vision)
    peft_model = apply_lora(model, LoraConfig(r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)
    assert sorted(peft_model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- Ray Train (slow)
# ``ray_local`` (tests/conftest.py): one embedded 2-CPU Ray for the session, never `ray stop`.


def _train_cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    return load_config(
        Path(__file__).resolve().parent.parent / "configs" / "demo-cpu.yaml",
        [
            f"run_dir={run_dir}",
            f"cache_dir={_cache_dir()}",
            "train.num_workers=2",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=2",
            "train.learning_rate=0.01",
            "train.image_size=112",
            "train.max_length=256",
            "train.checkpoint_every=4",
            "train.log_every=100",
            "train.eval_samples=8",
            *overrides,
        ],
    )


def _toy_run(run_dir: Path) -> RunDir:
    run = RunDir(str(run_dir))
    for name, table in toy_tables(n_users=34).items():
        run.write_table(name, table)
    return run


def _yes_no_margin(model, processor, samples: list[dict]) -> float:
    """Mean of (logit Yes - logit No) * (+1 for positives, -1 for negatives)."""
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    batch = RecommenderCollator(processor, max_length=256, image_size=112)(samples)
    with torch.no_grad():
        logits = model(**batch).logits
    margins = []
    for row, s in enumerate(samples):
        pos = (batch["labels"][row] != IGNORE_INDEX).nonzero().item() - 1
        sign = 1.0 if s["label"] else -1.0
        margins.append(sign * float(logits[row, pos, yes] - logits[row, pos, no]))
    return sum(margins) / len(margins)


@pytest.mark.slow
@pytest.mark.timeout(600)  # 244 s measured on 2 shared cores at load average ~25
def test_zero2_trains_survives_a_dead_worker_and_exports_adapter(
    ray_local, tmp_path, tiny_vlm, processor
):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from mllm_msr.engines.peft import load_adapter
    from mllm_msr.stages.train import run_train

    run = _toy_run(tmp_path / "run")
    cfg = _train_cfg(
        tmp_path / "run",
        "train.zero.stage=2",
        "train.max_steps=8",
        "train.lr_scheduler=linear",
        "train.warmup_ratio=0.125",
        "train.eval_every=3",
        "train.select_best=true",
        "train.length_bucket=2",
    )
    summary = run_train(cfg, run, fail_once_at_step=6)

    # the last rank's process died at step 6; the run restarted from the step-4 checkpoint
    assert summary["steps"] == 8 and summary["attempts"] == 2
    assert summary["resumed_from_steps"] == [4]
    assert [s for s, _ in summary["losses"]] == list(range(1, 9))
    losses = [loss for _, loss in summary["losses"]]
    # (the decaying schedule learns less late in the run than a constant lr would)
    assert sum(losses[-2:]) / 2 < 0.6 * losses[0], losses
    # one step of warmup from 0, then linear decay to 0, restored across the restart
    lrs = [lr for _, lr in summary["learning_rates"]]
    assert [s for s, _ in summary["learning_rates"]] == list(range(1, 9))
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs
    # validations on the 1:1 set at steps 3 and 6 (redone after the restart) and at the end;
    # the exported adapter is the one of the best validation AUC
    vals = summary["validations"]
    assert [v["step"] for v in vals] == [3, 6, 8]
    assert all(v["rows"] == 4 for v in vals)  # the toy data has 2 validation users
    best = max(vals, key=lambda v: v["auc"])
    assert summary["best_validation"]["auc"] == best["auc"]
    assert summary["exported_step"] == best["step"]
    assert set(summary["phase_seconds"]) == {"data", "collate", "forward", "backward", "optimizer"}
    assert summary["frozen_unchanged"] is True
    assert summary["rows_out"] == 68 and summary["fallback_users"] == 11

    # the adapter moved (lora_B starts at zero) and loads onto the base model for scoring
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = load_adapter(base, tmp_path / "run" / "adapter").eval()
    samples = [
        {
            "preference": "The user appears to have a preference for red.",
            "title": f"{c} 9",
            "summary": f"A {c.lower()} cover.",
            "image": img,
            "label": int(c == "Red"),
        }
        for c, img in (("Red", RED), ("Blue", BLUE))
    ]
    with tuned.disable_adapter():
        base_margin = _yes_no_margin(tuned, processor, samples)
    assert _yes_no_margin(tuned, processor, samples) > base_margin
    merged = tuned.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, reference[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


@pytest.mark.slow
def test_zero3_resumes_and_continues_the_step_count(ray_local, tmp_path):
    from safetensors.torch import load_file

    from mllm_msr.stages.train import run_train

    run = _toy_run(tmp_path / "run")
    # A stale torch build lock for DeepSpeed's comm op (as left by a loader killed mid-load)
    # used to hang every later training; the workers remove it under our kernel lock.
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(_cache_dir()) / "torch_extensions"
    baton = Path(ext_dir) / "deepspeed_shm_comm" / "lock"
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()
    zero3 = ("train.zero.stage=3", "train.zero.persistence_threshold=0")
    first = run_train(_train_cfg(tmp_path / "run", *zero3, "train.max_steps=3"), run)
    assert not baton.exists()
    assert first["steps"] == 3 and first["resumed_from_steps"] == []
    # ZeRO-3 partitions the (frozen) base weights: each of 2 ranks holds about half of them
    held = [r["params"] for r in first["rank_state_bytes"]]
    assert len(held) == 2 and max(held) < 0.6 * first["total_params"] * 4
    run.clear_stage("train")  # as after a crash: the stage is not complete, checkpoints remain
    second = run_train(_train_cfg(tmp_path / "run", *zero3, "train.max_steps=6"), run)
    assert second["steps"] == 6 and second["resumed_from_steps"] == [3]
    assert [s for s, _ in second["losses"]] == list(range(1, 7))
    assert second["losses"][:3] == first["losses"]
    assert second["losses"][-1][1] < first["losses"][0][1]
    assert second["frozen_unchanged"] is True
    # the adapter gathered from the ZeRO-3 partitions is complete and trained
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    shapes = {tuple(w.shape) for k, w in weights.items() if "lora_A" in k}
    assert len(weights) == 8 and all(0 not in s for s in shapes)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_validation_pairs_are_one_positive_and_one_seeded_negative_per_user():
    import pyarrow as pa

    from mllm_msr.stages.train import validation_pairs

    users = [f"u{u}" for u in range(5) for _ in range(21)]
    val = pa.table(
        {
            "user_id": users,
            "item_id": [f"i{k}" for k in range(len(users))],
            "label": [int(k % 21 == 3) for k in range(len(users))],
        }
    )
    pairs = validation_pairs(val, seed=0, max_rows=8)
    assert pairs.num_rows == 8  # whole pairs of the first 4 users (sorted)
    assert pairs["label"].to_pylist() == [1, 0] * 4
    assert pairs["user_id"].to_pylist() == [u for u in ["u0", "u1", "u2", "u3"] for _ in "pn"]
    assert pairs.equals(validation_pairs(val, seed=0, max_rows=8))
    other = validation_pairs(val, seed=1, max_rows=10)
    assert other["item_id"].to_pylist() != validation_pairs(val, 0, 10)["item_id"].to_pylist()
    assert validation_pairs(val, seed=0, max_rows=0).num_rows == 0


def test_lr_schedule_warms_up_then_decays():
    from mllm_msr.config import TrainConfig
    from mllm_msr.recommender.train_loop import lr_scheduler_factory

    param = torch.nn.Parameter(torch.zeros(1))
    for name, end in (("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)):
        opt = torch.optim.AdamW([param], lr=1.0)
        train = TrainConfig(lr_scheduler=name, warmup_ratio=0.2, learning_rate=1.0)
        sched = lr_scheduler_factory(train, total_steps=10)(opt)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(end, abs=1e-9), name
        if name != "constant":
            assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])), (name, lrs)


def test_length_bucketing_groups_similar_lengths_deterministically():
    from mllm_msr.recommender.train_loop import length_bucketed, row_length

    rows = [{"preference": "x" * n, "title": "t", "summary": ""} for n in range(40, 0, -1)]
    pools = lambda: [rows[i : i + 10] for i in range(0, 40, 10)]  # noqa: E731
    batches = list(length_bucketed(pools(), batch_size=4, seed=3))
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)  # 10-row pools: 2 each
    spread = [max(map(row_length, b)) - min(map(row_length, b)) for b in batches]
    assert max(spread) == 3  # sorted neighbours, where the shard order would mix lengths
    assert batches == list(length_bucketed(pools(), batch_size=4, seed=3))
    assert batches != list(length_bucketed(pools(), batch_size=4, seed=4))


def test_best_selection_needs_validation_rows():
    from mllm_msr.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="eval_samples"):
        TrainConfig(select_best=True, eval_samples=0)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.0)
