"""Turn SFT samples into model inputs: chat prompt + fixed-size image + supervised answer.

One sample is encoded as ``prompt ids (processor: chat template + image tokens) + answer ids``.
The answer ids are appended after the prompt's generation header, so the supervised position is
exactly the one the scorer reads (the first answer token's logits after the prompt), and
``labels`` are ``-100`` everywhere but on the answer tokens.

Images are resized to a fixed square (``TrainConfig.image_size``, rounded to the family's image
grid), so every image costs the same number of tokens (the family's
:attr:`~mllm_msr.families.Family.image_tokens` rule). When a sample is longer than
``max_length``, the ``history`` prompt's titles are dropped (oldest first), then the preference
text is shortened (then the item summary, if the preference alone is not enough); image tokens
and the answer are never cut. :attr:`RecommenderCollator.shortened` counts the shortened samples.
A ``max_length`` that cannot hold the template, one image and the answer fails when the collator
is built (before any model is loaded), naming the settings.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mllm_msr import families, prompts

IGNORE_INDEX = -100
"""Label value the loss ignores."""

SHORTENABLE_FIELDS = ("preference", "summary")
"""Sample fields cut (in this order) when a prompt does not fit ``max_length``."""


def fixed_side(image_size: int, processor: Any, family: families.Family | None = None) -> int:
    """``image_size`` rounded to the family's image grid (:attr:`~mllm_msr.families.Family.
    image_grid`: patch x merge for Qwen2-VL; that rule for a processor of no known family)."""
    return families.image_side(image_size, processor, family)


def load_image(data: bytes, side: int) -> Image.Image:
    """Decode image bytes to RGB and resize to ``side`` x ``side``."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


def recommender_collator(processor: Any, train: Any, family: families.Family | None = None):
    """The collator of ``train`` (a :class:`~mllm_msr.config.TrainConfig`): the one encoder
    that training (:func:`mllm_msr.recommender.train_loop.train_loop`) and scoring
    (:class:`mllm_msr.recommender.score.YesNoScorer`) both build, so their prompts cannot differ."""
    return RecommenderCollator(
        processor,
        train.max_length,
        train.image_size,
        with_image=train.multimodal,
        family=family,
        prompt=train.prompt,
        history_n=train.prompt_history,
    )


class RecommenderCollator:
    """Encode and pad SFT samples (dicts with ``preference``, ``title``, ``summary``, ``image``,
    ``label``) into a batch for the recommender's forward pass.

    Args:
        processor: the model's processor (or a tokenizer for text-only models).
        max_length: the longest sequence allowed (prompt with image tokens + answer).
        image_size: requested side of the square image.
        with_image: give the candidate image to the model (False: text-only prompts).
        family: the model's :class:`~mllm_msr.families.Family` (its image sizing rule); None
            applies the patch x merge rule of the processor.
        prompt: the recommender prompt (``train.prompt``, :data:`mllm_msr.prompts.
            RECOMMENDER_PROMPTS`); ``history_n``: history titles the ``history`` prompt lists
            (``train.prompt_history``).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int,
        image_size: int,
        with_image: bool = True,
        family: families.Family | None = None,
        prompt: str = "summary",
        history_n: int = 5,
    ):
        prompts.recommender_template(prompt)  # an unknown prompt fails here, not per sample
        self.prompt = prompt
        self.history_n = history_n
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.multimodal_processor = hasattr(processor, "image_processor")
        self.with_image = with_image and self.multimodal_processor
        self.side = fixed_side(image_size, processor, family)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.shortened = 0
        """Samples whose text was shortened to fit ``max_length`` (since construction)."""
        self.encoded = 0
        self.family = family
        self.image_tokens = 0
        """Prompt tokens of one image (the family's rule at :attr:`side`; 0 without images)."""
        if self.with_image:
            rule = (family.image_tokens if family is not None else None) or (
                families.patch_merge_tokens
            )
            self.image_tokens = rule(processor, self.side)
        self.min_tokens = self._check_fits()
        """Tokens of a sample with empty text fields (template + image + longest answer)."""

    def _check_fits(self) -> int:
        """Tokens of an empty sample (template, one image, the longer answer); raises when that
        exceeds ``max_length``, naming the settings that make room."""
        blank = Image.new("RGB", (self.side, self.side)) if self.with_image else None
        enc = self._encode_prompt({"preference": "", "title": "", "summary": ""}, blank)
        answer = max(len(self.answer_ids(label)) for label in (0, 1))
        need = int(enc["input_ids"].shape[1]) + answer
        if need <= self.max_length:
            return need
        name = self.family.name if self.family is not None else "this model"
        fixes = [f"raise train.max_length to at least {need} (plus room for the text)"]
        if self.with_image:
            fixed = self.family is not None and self.family.fixed_image_tokens
            if not fixed:
                fixes.append("lower train.image_size")
            fixes.append("or set train.multimodal: false (text-only prompts)")
            what = (
                f"one image of train.image_size={self.side} px costs {self.image_tokens} tokens "
                f"in family {name}"
                + (" whatever the image size (the processor resizes to its own)" if fixed else "")
                + f"; with the template and the answer a sample needs {need}"
            )
        else:
            what = f"the template and the answer alone need {need} tokens"
        raise ValueError(
            f"train.max_length={self.max_length} cannot hold a recommender sample: {what}. "
            f"To fix: {'; '.join(fixes)}."
        )

    # ----------------------------------------------------------------- one sample
    def answer_ids(self, label: int) -> list[int]:
        return self.tokenizer(prompts.answer_text(int(label)), add_special_tokens=False)[
            "input_ids"
        ]

    def _encode_prompt(self, fields: dict[str, str], image: Image.Image | None) -> dict:
        messages = prompts.recommender_chat(
            self.prompt,
            fields["preference"],
            fields["title"],
            fields["summary"],
            with_image=image is not None,
            history_titles=fields.get("history_titles"),
            history_n=self.history_n,
        )
        templater = (
            self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        )
        text = templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.multimodal_processor:
            # Text-only samples go through the processor too, so that every sample of a batch
            # has the same keys (e.g. Qwen2-VL's ``mm_token_type_ids``).
            images = [image] if image is not None else None
            enc = self.processor(
                text=[text], images=images, return_tensors="pt", add_special_tokens=False
            )
        else:
            enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        return dict(enc)

    def _shorten(self, text: str, excess: int) -> str:
        """Drop about ``excess`` tokens from the end of ``text``; always returns shorter text."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(0, len(ids) - excess)
        short = self.tokenizer.decode(ids[:keep], skip_special_tokens=True) if keep else ""
        return short if len(short) < len(text) else text[: len(text) // 2]

    def encode(self, sample: dict) -> dict[str, Any]:
        """Encode one sample; returns the processor outputs (batch dim 1) plus ``labels``."""
        fields = {
            "preference": sample.get("preference") or "",
            "title": sample.get("title") or "",
            "summary": sample.get("summary") or "",
            # only what the prompt shows: the history prompt's most recent titles
            "history_titles": list(sample.get("history_titles") or [])[-self.history_n :]
            if self.prompt == "history" and self.history_n
            else [],
        }
        data = sample.get("image")
        image = load_image(data, self.side) if self.with_image and data else None
        answer = self.answer_ids(sample["label"])
        enc = self._encode_prompt(fields, image)
        shortened = False
        # The history prompt's titles go first, oldest first (the preference summarizes them).
        while (
            enc["input_ids"].shape[1] + len(answer) > self.max_length and fields["history_titles"]
        ):
            fields["history_titles"] = fields["history_titles"][1:]
            enc = self._encode_prompt(fields, image)
            shortened = True
        for name in SHORTENABLE_FIELDS:
            while enc["input_ids"].shape[1] + len(answer) > self.max_length and fields[name]:
                excess = enc["input_ids"].shape[1] + len(answer) - self.max_length
                fields[name] = self._shorten(fields[name], excess)
                enc = self._encode_prompt(fields, image)
                shortened = True
        n_prompt = enc["input_ids"].shape[1]
        if n_prompt + len(answer) > self.max_length:
            raise ValueError(
                f"max_length={self.max_length} cannot hold the template, title and image tokens "
                f"({n_prompt} prompt + {len(answer)} answer tokens with empty preference/summary)"
            )
        self.shortened += int(shortened)
        self.encoded += 1
        answer_t = torch.tensor([answer], dtype=enc["input_ids"].dtype)
        seq_keys = [
            k for k, v in enc.items() if torch.is_tensor(v) and v.shape[:2] == (1, n_prompt)
        ]
        for key in seq_keys:
            tail = (
                answer_t
                if key == "input_ids"
                else torch.full_like(answer_t, 1 if key == "attention_mask" else 0)
            )
            enc[key] = torch.cat([enc[key], tail.to(enc[key].dtype)], dim=1)
        labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
        labels[0, n_prompt:] = answer_t[0]
        enc["labels"] = labels
        enc["_seq_keys"] = [*seq_keys, "labels"]
        return enc

    # ----------------------------------------------------------------- batch
    def collate(self, encoded: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad sequence tensors and concatenate image tensors of encoded samples."""
        longest = max(e["input_ids"].shape[1] for e in encoded)
        seq_keys = list(dict.fromkeys(k for e in encoded for k in e["_seq_keys"]))
        batch: dict[str, torch.Tensor] = {}
        for key in seq_keys:
            fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            rows = []
            for e in encoded:
                t = e[key]
                pad = torch.full((1, longest - t.shape[1]), fill, dtype=t.dtype)
                rows.append(torch.cat([t, pad], dim=1))
            batch[key] = torch.cat(rows, dim=0)
        other = {k for e in encoded for k in e if k not in seq_keys and not k.startswith("_")}
        for key in sorted(other):
            parts = [e[key] for e in encoded if key in e]
            batch[key] = torch.cat(parts, dim=0)
        return batch

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(s) for s in samples])
