"""The vLLM adapter: the only module of the project that imports :mod:`vllm`.

One :class:`VLLMEngine` owns one ``vllm.LLM``, built from an :class:`~mllm_msr.config.EngineConfig`
(``tiny:<name>`` models are built offline on first use). It takes chats in the format of
:mod:`mllm_msr.prompts` (messages whose content is a string or a list of ``text``/``image``
parts, images as PIL images or encoded bytes) and offers:

* :meth:`VLLMEngine.generate`: text out, with prompt/output token counts (greedy when the
  temperature is 0, seeded otherwise), one synchronous call per batch;
* :meth:`VLLMEngine.stream`: the same requests fed continuously (:class:`GenerationStream`:
  submit any time, step the engine, collect answers as they finish);
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
from mllm_msr.runtime import EngineThread, apply_process_env, has_gpu
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
    Variables the user already set are kept, except ``VLLM_CPU_KVCACHE_SPACE`` and, without a
    GPU, ``OMP_NUM_THREADS`` (:func:`cpu_threads`), which follow the config. Must run before the
    engine is created.
    """
    gpu = has_gpu()  # this process's node: the CPU-only settings never reach a GPU worker
    forced = {} if gpu else {"VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kvcache_space_gib)}
    if not gpu:  # the engine's threads (a Ray actor's OMP_NUM_THREADS is its num_cpus)
        forced["OMP_NUM_THREADS"] = str(cpu_threads(config))
    return apply_process_env(cache_dir, gpu=gpu, prefix="VLLM_", forced=forced)


def cpu_threads(config: EngineConfig) -> int:
    """The engine's OpenMP/torch threads on CPU: ``config.cpu_threads``, else the process's
    ``OMP_NUM_THREADS`` (a Ray actor's ``num_cpus``), else the cores it may run on."""
    if config.cpu_threads:
        return config.cpu_threads
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _apply_cpu_threads(n: int) -> None:
    """Set torch's intra-op threads before vLLM starts: vLLM's CPU worker then replaces
    ``torch.set_num_threads`` by a warning, and keeps threads it finds with ``OMP_NUM_THREADS``
    set outside it (otherwise it tries to reduce them to 1, which that replacement skips: the
    count would be whatever the process had)."""
    import torch

    if torch.get_num_threads() != n:
        torch._C.set_num_threads(n)  # torch.set_num_threads itself, past vLLM's replacement


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


def _sampling_params(sampling: SamplingConfig, seed: int):
    """vLLM's ``SamplingParams`` of one request (greedy when the temperature is 0; ``seed``
    is used only when sampling)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
        seed=None if sampling.temperature == 0 else seed,
    )


def _generation(o: Any) -> Generation:
    """A :class:`Generation` from a vLLM ``RequestOutput`` or the exception of a request."""
    if isinstance(o, Exception):
        return Generation("", 0, 0, "error", f"{type(o).__name__}: {o}")
    return Generation(
        text=o.outputs[0].text,
        prompt_tokens=len(o.prompt_token_ids or []),
        output_tokens=len(o.outputs[0].token_ids),
        finish_reason=o.outputs[0].finish_reason,
    )


class GenerationStream:
    """Continuous feeding of one :class:`VLLMEngine` (vLLM's ``LLM.enqueue_chat`` +
    ``LLMEngine.step``).

    :meth:`submit` renders a chat exactly as :meth:`VLLMEngine.generate` does (the same chat
    template path, ``LLM.chat``'s) and queues it in the engine at once; :meth:`step` runs one
    engine scheduling step (one forward pass over the running batch: prefills and decodes)
    and returns the requests that finished, as ``(tag, Generation)``. A request submitted
    while others run joins the running batch at the next step, so the batch stays full
    instead of draining as in a synchronous ``generate`` call.

    Sampling is per request: greedy when the temperature is 0, else seeded with the seed given
    to :meth:`submit` (results do not depend on what else runs). With ``on_error="skip"`` a
    request the engine refuses (e.g. a prompt longer than ``max_model_len``, an undecodable
    image) comes back from the next :meth:`step` as a ``Generation`` with
    ``finish_reason="error"``; with ``"raise"`` :meth:`submit` raises. The stream assumes it
    is the engine's only user while requests are in flight; :meth:`close` aborts what is left.
    """

    def __init__(
        self,
        engine: VLLMEngine,
        sampling: SamplingConfig,
        lora_path: str | os.PathLike | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.engine = engine
        self.sampling = sampling
        self.on_error = on_error
        self._lora = engine._lora_request(lora_path)
        # LLM's request id (a counter; what outputs carry) -> (engine's internal id, tag)
        self._tags: dict[str, tuple[str, Any]] = {}
        self._failed: list[tuple[Any, Generation]] = []
        self.steps = 0
        """Engine steps run so far (scheduling iterations, each one forward pass)."""
        self.submitted = 0

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet returned by :meth:`step`."""
        return len(self._tags) + len(self._failed)

    def submit(self, tag: Any, chat: Chat, seed: int | None = None) -> None:
        """Queue ``chat`` in the engine; its answer comes back from :meth:`step` with ``tag``."""
        self.submitted += 1
        params = _sampling_params(self.sampling, self.sampling.seed if seed is None else seed)
        try:
            chats = self.engine._prepare([chat])
            ids = self.engine.thread.run(
                self.engine.llm.enqueue_chat,
                chats,
                [params],
                use_tqdm=False,
                lora_request=self._lora,
            )
        except _request_errors() as exc:
            if self.on_error == "raise":
                raise
            self._failed.append((tag, _generation(exc)))
            return
        # the engine returns its internal id "<LLM's id>-<random suffix>"; outputs carry LLM's
        self._tags[ids[0].split("-", 1)[0]] = (ids[0], tag)

    def step(self) -> list[tuple[Any, Generation]]:
        """One engine step; the requests that finished (refused requests first, no step)."""
        if self._failed:
            failed, self._failed = self._failed, []
            return failed
        if not self._tags:
            return []
        engine = self.engine.llm.llm_engine
        out = []
        self.steps += 1
        for o in self.engine.thread.run(engine.step):
            if o.finished and o.request_id in self._tags:
                out.append((self._tags.pop(o.request_id)[1], _generation(o)))
        if self._tags and not engine.has_unfinished_requests():
            lost = sorted(self._tags)
            self._tags.clear()
            raise RuntimeError(f"the engine dropped requests {lost} without an answer")
        return out

    def close(self) -> None:
        """Abort the requests still in the engine."""
        if self._tags and self.engine._llm is not None:
            internal = [i for i, _ in self._tags.values()]
            abort = self.engine.llm.llm_engine.abort_request
            self.engine.thread.run(abort, internal, internal=True)
        self._tags.clear()
        self._failed.clear()


class VLLMEngine:
    """One vLLM engine built from an :class:`EngineConfig`.

    ``cache_dir`` holds the tiny models and vLLM's caches (default:
    :func:`mllm_msr.tiny.default_cache_dir`). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: EngineConfig, cache_dir: str | os.PathLike | None = None) -> None:
        self.config = config
        self.thread = EngineThread("vllm-engine")
        """The thread that builds the engine and makes every call to it (OpenMP state is per
        calling thread: :class:`~mllm_msr.runtime.EngineThread`); any thread may call the
        methods."""
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.model_path = resolve_model(config.model, self.cache_dir)
        built_family = tiny_family(config.model)
        if built_family is not None and built_family != config.family:
            raise ValueError(
                f"{config.model} is a {built_family!r} model but the engine config says "
                f"family={config.family!r}"
            )
        self.family = prompts.family(config.family)
        applied = configure_environment(config, self.cache_dir)
        self.cpu_threads: int | None = None
        """OpenMP/torch threads of the engine (None on a GPU host)."""
        if "OMP_NUM_THREADS" in applied:
            self.cpu_threads = int(applied["OMP_NUM_THREADS"])

        from vllm import LLM  # before quiet_vllm: importing vLLM sets up its log handlers

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
        log.info(
            "starting vLLM engine for %s (%s, %s CPU threads)",
            config.model,
            self.model_path,
            self.cpu_threads,
        )
        self._llm = None
        try:
            self._llm = self.thread.run(self._start, LLM, kwargs)
        except BaseException:
            self.thread.close()
            raise
        self._loras: dict[str, Any] = {}
        self._yes_no: tuple[int, int] | None = None
        self._warned_dtype = False

    def _start(self, llm_class: Any, kwargs: dict[str, Any]) -> Any:
        """Build the ``vllm.LLM`` (on the engine thread, with its thread count)."""
        if self.cpu_threads is not None:
            _apply_cpu_threads(self.cpu_threads)
        return llm_class(**kwargs)

    def torch_threads(self) -> int:
        """torch's intra-op threads on the engine thread (what the engine computes with)."""
        import torch

        return self.thread.run(torch.get_num_threads)

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
        """:meth:`_chat_here` on the engine thread."""
        return self.thread.run(self._chat_here, requests, params, lora_path, on_error)

    def _chat_here(
        self, requests: Sequence[Chat], params: list, lora_path, on_error: str
    ) -> list[Any]:
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
        if not requests:
            return []
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        params = [
            _sampling_params(sampling, seeds[i] if seeds is not None else sampling.seed + i)
            for i in range(len(requests))
        ]
        return [_generation(o) for o in self._chat(requests, params, lora_path, on_error)]

    def stream(
        self,
        sampling: SamplingConfig,
        lora_path: str | os.PathLike | None = None,
        on_error: str = "raise",
    ) -> GenerationStream:
        """A :class:`GenerationStream` over this engine: requests submitted at any time, the
        engine stepped by the caller, answers collected as they finish (continuous feeding)."""
        return GenerationStream(self, sampling, lora_path, on_error)

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
        lora = self._lora_request(lora_path)
        outputs = self.thread.run(
            self.llm.generate, inputs, params, use_tqdm=False, lora_request=lora
        )
        scores = []
        for o in outputs:
            first = o.outputs[0].logprobs[0]
            if yes not in first or no not in first:
                raise RuntimeError(f"vLLM returned logprobs for {sorted(first)}, not {[yes, no]}")
            diff = first[no].logprob - first[yes].logprob
            scores.append(1.0 / (1.0 + math.exp(diff)) if diff < 700 else 0.0)
        return scores

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prompt prefixes (benchmarks: each timed pass starts without the
        previous pass's prompts in the cache). True when vLLM reset it."""
        return bool(self.thread.run(self.llm.reset_prefix_cache))

    def close(self) -> None:
        """Release the engine (memory, KV cache). The object is unusable afterwards."""
        if self._llm is None:
            return
        try:
            self.thread.run(self._close_here)
        finally:
            self.thread.close()

    def _close_here(self) -> None:
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
