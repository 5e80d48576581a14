"""The vLLM adapter: the only module of the project that imports :mod:`vllm`.

One :class:`VLLMEngine` owns one ``vllm.LLM``, built from an :class:`~mllm_msr.config.EngineConfig`
(``tiny:<name>`` models are built offline on first use). It takes chats in the format of
:mod:`mllm_msr.prompts` (messages whose content is a string or a list of ``text``/``image``
parts, images as PIL images or encoded bytes) and offers:

* :meth:`VLLMEngine.generate`: text out, with prompt/output token counts (greedy when the
  temperature is 0, seeded otherwise);
* :meth:`VLLMEngine.score_yes_no`: ``p(Yes) / (p(Yes) + p(No))`` of the first answer token,
  optionally through a LoRA adapter (score in fp32: bf16 scores collapse into ties).

On a machine without a GPU the CPU settings measured in DESIGN.md section 3 are applied before
the engine starts: in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), no OpenMP
thread binding, a KV cache of ``EngineConfig.cpu_kvcache_space_gib`` GiB. vLLM's cache and
config roots are placed in the project cache directory, usage statistics are off and the hub is
offline (``HF_HUB_OFFLINE=1`` unless the environment says otherwise).

Example::

    engine = VLLMEngine(EngineConfig(model="tiny:qwen2-vl"))
    out = engine.generate([prompts.item_summary_messages(img, "Red circle")], SamplingConfig())
    engine.close()
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_msr import prompts
from mllm_msr.config import EngineConfig, SamplingConfig
from mllm_msr.runtime import apply_process_env, has_gpu
from mllm_msr.tiny import default_cache_dir, resolve_model, tiny_family

log = logging.getLogger(__name__)

Chat = prompts.Chat


def _request_errors() -> tuple[type[BaseException], ...]:
    """What one bad request raises (too long a prompt, an undecodable image, ...)."""
    from vllm.exceptions import VLLMClientError

    return (VLLMClientError, ValueError, TypeError, OSError, RuntimeError)


@dataclass
class Generation:
    """One generated answer."""

    text: str
    prompt_tokens: int
    """Prompt length in tokens, image tokens included."""
    output_tokens: int
    finish_reason: str | None = None
    """``stop``, ``length``, or ``error`` (then ``error`` says why; only with ``on_error="skip"``)."""
    error: str | None = None


def configure_environment(config: EngineConfig, cache_dir: str | os.PathLike) -> dict[str, str]:
    """Set vLLM's environment for this process; returns the variables it set.

    vLLM's part of :func:`mllm_msr.runtime.process_env` (caches, telemetry off, CPU-only settings
    only without a GPU), applied by :func:`mllm_msr.runtime.apply_process_env`; the hub mode is
    the config's (``hf_hub_offline``, set on every worker by :func:`mllm_msr.runtime.init_ray`).
    Variables the user already set are kept, except ``VLLM_CPU_KVCACHE_SPACE`` which follows the
    config. Must run before the engine is created.
    """
    gpu = has_gpu()  # this process's node: the CPU-only settings never reach a GPU worker
    forced = {} if gpu else {"VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kvcache_space_gib)}
    return apply_process_env(cache_dir, gpu=gpu, prefix="VLLM_", forced=forced)


def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as img:
            return img.convert("RGB")
    raise TypeError(f"image must be a PIL image or encoded bytes, got {type(image).__name__}")


def to_vllm_chat(chat: Chat) -> list[dict[str, Any]]:
    """Convert a :mod:`mllm_msr.prompts` chat to vLLM's OpenAI-like message format."""
    out = []
    for message in chat:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if part.get("image") is None:
                        raise ValueError("an image part has no image (image=None)")
                    parts.append({"type": "image_pil", "image_pil": _to_pil(part["image"])})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise ValueError(f"unsupported content part type {part.get('type')!r}")
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


class VLLMEngine:
    """One vLLM engine built from an :class:`EngineConfig`.

    ``cache_dir`` holds the tiny models and vLLM's caches (default:
    :func:`mllm_msr.tiny.default_cache_dir`). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: EngineConfig, cache_dir: str | os.PathLike | None = None) -> None:
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.model_path = resolve_model(config.model, self.cache_dir)
        built_family = tiny_family(config.model)
        if built_family is not None and built_family != config.family:
            raise ValueError(
                f"{config.model} is a {built_family!r} model but the engine config says "
                f"family={config.family!r}"
            )
        self.family = prompts.family(config.family)
        configure_environment(config, self.cache_dir)

        from vllm import LLM

        from mllm_msr import console

        quiet = console.quiet_vllm()  # known CPU notes and repeated warnings, dropped at source
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
        )
        if quiet:
            kwargs["use_tqdm_on_load"] = False  # "Loading safetensors checkpoint shards" bars
        if self.family.multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": config.limit_images_per_prompt}
            mm_kwargs = self.family.processor_kwargs(config.image_max_pixels)
            if mm_kwargs:
                kwargs["mm_processor_kwargs"] = mm_kwargs
        if config.enable_lora:
            kwargs.update(
                enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=config.max_loras
            )
        log.info("starting vLLM engine for %s (%s)", config.model, self.model_path)
        self._llm = LLM(**kwargs)
        self._loras: dict[str, Any] = {}
        self._yes_no: tuple[int, int] | None = None
        self._warned_dtype = False

    # ------------------------------------------------------------------ helpers

    @property
    def llm(self):
        """The underlying ``vllm.LLM`` (for adapter-internal use and debugging)."""
        if self._llm is None:
            raise RuntimeError("engine is closed")
        return self._llm

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    def _prepare(self, requests: Sequence[Chat]) -> list[list[dict[str, Any]]]:
        chats = []
        for chat in requests:
            if not self.family.multimodal:
                chat = prompts.text_only(chat)
            chats.append(to_vllm_chat(chat))
        return chats

    def _lora_request(self, lora_path: str | os.PathLike | None):
        if lora_path is None:
            return None
        if not self.config.enable_lora:
            raise ValueError("a LoRA adapter was given but EngineConfig.enable_lora is false")
        from vllm.lora.request import LoRARequest

        key = str(Path(lora_path).resolve())
        if key not in self._loras:
            self._loras[key] = LoRARequest(
                f"adapter{len(self._loras) + 1}", len(self._loras) + 1, key
            )
        return self._loras[key]

    def answer_token_ids(self) -> tuple[int, int]:
        """Token ids scored as ``Yes`` and ``No``: :func:`mllm_msr.prompts.answer_token_ids`,
        the same ids the SFT collator appends as targets."""
        if self._yes_no is None:
            self._yes_no = prompts.answer_token_ids(self.tokenizer)
        return self._yes_no

    # ------------------------------------------------------------------ API

    def _chat(self, requests: Sequence[Chat], params: list, lora_path, on_error: str) -> list[Any]:
        """Run ``LLM.chat``; with ``on_error="skip"`` a failing batch is retried request by
        request and the requests that still fail give their exception instead of an output."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        lora = self._lora_request(lora_path)
        errors = _request_errors()
        try:
            return self.llm.chat(self._prepare(requests), params, use_tqdm=False, lora_request=lora)
        except errors as exc:
            if on_error == "raise":
                raise
            if len(requests) == 1:
                return [exc]
            log.warning("batch of %d failed (%s); retrying one by one", len(requests), exc)
        results: list[Any] = []
        for chat, param in zip(requests, params):
            try:
                chats = self._prepare([chat])
                results.append(self.llm.chat(chats, [param], use_tqdm=False, lora_request=lora)[0])
            except errors as exc:
                results.append(exc)
        return results

    def generate(
        self,
        requests: Sequence[Chat],
        sampling: SamplingConfig,
        lora_path: str | os.PathLike | None = None,
        seeds: Sequence[int] | None = None,
        on_error: str = "raise",
    ) -> list[Generation]:
        """Answer each chat (image parts are dropped for text-only families).

        Greedy when ``sampling.temperature == 0``. Otherwise request ``i`` samples with seed
        ``seeds[i]``, by default ``sampling.seed + i``; pass seeds derived from stable keys (item
        or user ids) to make sampled outputs independent of how requests are batched.
        ``on_error="skip"`` turns a request that fails (e.g. a prompt longer than
        ``max_model_len``, an undecodable image) into a :class:`Generation` with
        ``finish_reason="error"`` instead of failing the whole batch.
        """
        from vllm import SamplingParams

        if not requests:
            return []
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        params = [
            SamplingParams(
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                seed=None
                if sampling.temperature == 0
                else (seeds[i] if seeds is not None else sampling.seed + i),
            )
            for i in range(len(requests))
        ]
        results = []
        for o in self._chat(requests, params, lora_path, on_error):
            if isinstance(o, Exception):
                results.append(Generation("", 0, 0, "error", f"{type(o).__name__}: {o}"))
            else:
                results.append(
                    Generation(
                        text=o.outputs[0].text,
                        prompt_tokens=len(o.prompt_token_ids or []),
                        output_tokens=len(o.outputs[0].token_ids),
                        finish_reason=o.outputs[0].finish_reason,
                    )
                )
        return results

    def score_yes_no(
        self,
        requests: Sequence[Chat],
        lora_path: str | os.PathLike | None = None,
        on_error: str = "raise",
    ) -> list[float]:
        """``p(Yes) / (p(Yes) + p(No))`` of the first answer token of each chat.

        With ``on_error="skip"`` a request that fails scores NaN instead of failing the batch.
        """
        from vllm import SamplingParams

        if not requests:
            return []
        if self.config.dtype in ("bfloat16", "float16", "half") and not self._warned_dtype:
            self._warned_dtype = True
            log.warning(
                "scoring in %s: scores may collapse into ties; use float32", self.config.dtype
            )
        yes, no = self.answer_token_ids()
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[yes, no])
        scores = []
        for o in self._chat(requests, [params] * len(requests), lora_path, on_error):
            if isinstance(o, Exception):
                scores.append(math.nan)
                continue
            first = o.outputs[0].logprobs[0]
            diff = first[no].logprob - first[yes].logprob
            scores.append(1.0 / (1.0 + math.exp(diff)) if diff < 700 else 0.0)
        return scores

    def score_yes_no_token_ids(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        yes_no: tuple[int, int],
        lora_path: str | os.PathLike | None = None,
    ) -> list[float]:
        """``p(Yes) / (p(Yes) + p(No))`` of the next token after each prompt, given as token ids
        (the recommender collator's encoding, so the template cannot drift from training).

        ``SamplingParams(logprob_token_ids=[yes, no])`` returns the log-probabilities of exactly
        these two ids at the first generated position, both always present, computed from the
        raw model logits (vLLM's default ``logprobs_mode``: raw, before any sampling
        processing); the score is their two-way softmax. Text-only prompts (no image data).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompt_token_ids:
            return []
        yes, no = yes_no
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[yes, no])
        inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_token_ids]
        outputs = self.llm.generate(
            inputs, params, use_tqdm=False, lora_request=self._lora_request(lora_path)
        )
        scores = []
        for o in outputs:
            first = o.outputs[0].logprobs[0]
            if yes not in first or no not in first:
                raise RuntimeError(f"vLLM returned logprobs for {sorted(first)}, not {[yes, no]}")
            diff = first[no].logprob - first[yes].logprob
            scores.append(1.0 / (1.0 + math.exp(diff)) if diff < 700 else 0.0)
        return scores

    def close(self) -> None:
        """Release the engine (memory, KV cache). The object is unusable afterwards."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort on teardown
                log.debug("engine core shutdown failed", exc_info=True)
        del llm, engine, core
        import gc

        gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
