"""Yes/No scoring of (user, candidate) samples with the recommender.

The score of a sample is ``p(yes) / (p(yes) + p(no))`` from the logits of the first answer token,
read at the exact position the training loss supervises: samples are encoded by the training
collator (:class:`~mllm_msr.recommender.collate.RecommenderCollator`), so training and scoring share
one prompt template, one image resolution and one truncation rule.

Path chosen: a transformers forward pass in Ray Data actors (``map_batches`` over an actor
pool), base weights + the peft adapter, fp32 by default. Why: it is the path that works the same
on CPU and GPU for every model family the trainer supports, it reads the same encoded inputs as
training (no second implementation of the template), and it needs no merged checkpoint. See
the README ("Scoring") for the alternatives measured.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from mllm_msr import families, prompts
from mllm_msr.config import EvaluateConfig, TrainConfig
from mllm_msr.runtime import EngineThread


def load_recommender(
    model_path: str,
    adapter_path: str | None,
    precision: str = "fp32",
    family: str | families.Family | None = None,
):
    """Load the recommender (base model, plus the LoRA adapter when given) for inference.

    ``family``: a :class:`~mllm_msr.families.Family`, or the name of one (``train.family``,
    checked against the model); None infers it from the model's config.
    """
    import torch

    fam = family if isinstance(family, families.Family) else families.resolve(model_path, family)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = families.load_model(model_path, fam, dtype)
    if adapter_path:
        from mllm_msr.engines.peft import load_adapter
        from mllm_msr.runtime import local_copy

        with local_copy(adapter_path) as local:  # the run's adapter may be on object storage
            model = load_adapter(model, local)
    model.eval()
    return model


def load_processor(model_path: str, family: str | families.Family | None = None):
    """The recommender's input encoder (``family`` as in :func:`load_recommender`)."""
    fam = family if isinstance(family, families.Family) else families.resolve(model_path, family)
    return families.load_processor(model_path, fam)


class YesNoScorer:
    """A ``map_batches`` callable: SFT-sample rows in, ``score`` column out.

    Args:
        model: model spec (``tiny:<name>``, a local path or a hub id already cached).
        adapter: a peft adapter folder, or None for the zero-shot base model.
        train: the training config (image size, max length, multimodal) the adapter was trained
            with; scoring must encode samples the same way.
        precision: ``fp32`` (default; bf16 collapses scores into ties) or ``bf16``.
        micro_batch: samples per forward pass.
        share_prefix: text-only models: encode the prompt prefix that a user's candidates share
            (template + preference) once and score the candidates from its KV cache
            (:meth:`score_rows_shared_prefix`); same scores up to float rounding, several times
            fewer tokens. Multimodal batches always take the plain path.
        cache_dir: the node's model cache (:func:`mllm_msr.runtime.node_cache_dir`): tiny models
            are built and ``s3://`` models synced there (default: ``$MLLM_MSR_CACHE``).
    """

    def __init__(
        self,
        model: str,
        adapter: str | None,
        train: TrainConfig,
        precision: str = "fp32",
        micro_batch: int = 8,
        share_prefix: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        import torch

        from mllm_msr.recommender.collate import recommender_collator
        from mllm_msr.tiny import resolve_model

        path = resolve_model(model, cache_dir)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        fam = families.resolve(path, train.family, "train.family")
        # Loaded and called (``__call__``) on one thread: one OpenMP team (EngineThread).
        self.thread = EngineThread("scorer")
        self.model = self.thread.run(
            lambda: load_recommender(path, adapter, precision, fam).to(self.device)
        )
        processor = load_processor(path, fam)
        self.collator = recommender_collator(processor, train, fam)
        # The ids training supervises (raises when Yes and No share a first token).
        self.yes_id, self.no_id = prompts.answer_token_ids(self.collator.tokenizer)
        self.micro_batch = micro_batch
        self.share_prefix = share_prefix

    def score_rows_shared_prefix(self, rows: list[dict]) -> np.ndarray:
        """Score rows, consecutive rows of one user sharing the KV cache of their common prefix.

        The prompts of one user's candidates differ only after the preference text. Per run of
        consecutive rows with the same ``user_id``, the longest common token prefix of their
        encoded prompts is run once; the cache is repeated for each micro-batch of candidates
        and only their suffixes (right-padded) are run. Falls back to :meth:`score_rows` for
        rows whose encoding carries more than token ids (e.g. images).
        """
        out = np.empty(len(rows), dtype=np.float64)
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end].get("user_id") == rows[start].get("user_id"):
                end += 1
            out[start:end] = self._score_group(rows[start:end])
            start = end
        return out

    def _score_group(self, rows: list[dict]) -> np.ndarray:
        import copy

        import torch

        encoded = [self.collator.encode({**r, "label": 1}) for r in rows]
        plain = {"input_ids", "attention_mask", "labels"}
        if any(set(k for k in e if not k.startswith("_")) - plain for e in encoded):
            return self._score_plain(rows)
        # The prompt is everything before the first supervised (answer) token.
        prompts = [
            e["input_ids"][0][: int((e["labels"][0] != -100).nonzero()[0, 0])] for e in encoded
        ]
        shared = min(len(p) for p in prompts) - 1  # every row keeps at least one token
        ref = prompts[0]
        for p in prompts[1:]:
            diff = (p[:shared] != ref[:shared]).nonzero()
            if len(diff):
                shared = int(diff[0, 0])
        out = np.empty(len(rows), dtype=np.float64)
        with torch.inference_mode():
            cache = None
            if shared > 0:
                prefix = ref[:shared].unsqueeze(0).to(self.device)
                cache = self.model(
                    input_ids=prefix, use_cache=True, logits_to_keep=1
                ).past_key_values
            for start in range(0, len(rows), self.micro_batch):
                tails = [p[shared:] for p in prompts[start : start + self.micro_batch]]
                n, longest = len(tails), max(len(t) for t in tails)
                ids = torch.full((n, longest), self.collator.pad_id, dtype=ref.dtype)
                mask = torch.zeros((n, shared + longest), dtype=torch.long)
                mask[:, :shared] = 1
                for i, t in enumerate(tails):
                    ids[i, : len(t)] = t
                    mask[i, shared : shared + len(t)] = 1
                kwargs = {}
                if cache is not None:
                    batch_cache = copy.deepcopy(cache)
                    batch_cache.batch_repeat_interleave(n)
                    kwargs["past_key_values"] = batch_cache
                last = torch.tensor([len(t) - 1 for t in tails])
                picked = self._logits_at(
                    last,
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=cache is not None,
                    **kwargs,
                )
                pair = torch.stack([picked[:, self.yes_id], picked[:, self.no_id]], dim=1)
                out[start : start + n] = torch.softmax(pair, dim=1)[:, 0].cpu().numpy()
        return out

    def _logits_at(self, positions, **inputs):
        """fp32 logits of row ``i`` at position ``positions[i]``; the vocabulary projection runs
        only at those positions (``logits_to_keep``), not at every position of the batch."""
        import torch

        keep, index = torch.unique(positions, return_inverse=True)
        logits = self.model(**inputs, logits_to_keep=keep.to(self.device)).logits
        if logits.shape[1] != keep.numel():  # a model that ignores logits_to_keep
            logits = logits[:, keep.to(logits.device)]
        rows = torch.arange(len(positions), device=logits.device)
        return logits[rows, index.to(logits.device)].float()

    def score_rows(self, rows: list[dict]) -> np.ndarray:
        if self.share_prefix:
            return self.score_rows_shared_prefix(rows)
        return self._score_plain(rows)

    def _score_plain(self, rows: list[dict]) -> np.ndarray:
        import torch

        out = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), self.micro_batch):
            chunk = rows[start : start + self.micro_batch]
            # Any label works: the answer token comes after the position that is read.
            batch = self.collator([{**r, "label": 1} for r in chunk])
            labels = batch.pop("labels")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # The first supervised position is the answer token; the logits one step before
            # predict it.
            first = (labels != -100).int().argmax(dim=1) - 1
            with torch.inference_mode():
                picked = self._logits_at(first, **batch)
            pair = torch.stack([picked[:, self.yes_id], picked[:, self.no_id]], dim=1)
            out[start : start + len(chunk)] = torch.softmax(pair, dim=1)[:, 0].cpu().numpy()
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        scores = self.thread.run(self.score_rows, rows)
        keep = batch.select(["user_id", "item_id", "label"])
        return keep.append_column("score", pa.array(scores, pa.float64()))


class VLLMYesNoScorer:
    """:class:`YesNoScorer`'s contract on vLLM (``evaluate.engine: vllm``), text-only models.

    Rows are encoded by the training collator (:func:`~mllm_msr.recommender.collate.
    recommender_collator`) and the prompt's token ids (everything before the supervised answer)
    go to vLLM as they are, so the template, truncation and special tokens are training's. The
    score is ``p(Yes) / (p(Yes) + p(No))`` from the two answer tokens' log-probabilities
    (:meth:`~mllm_msr.engines.vllm.VLLMEngine.score_yes_no_token_ids`); the adapter is applied
    per request (``enable_lora`` + ``LoRARequest``). The first candidate of every user is scored
    before the others, so the others find the user's prefix in vLLM's prefix cache.
    """

    def __init__(
        self,
        model: str,
        adapter: str | None,
        train: TrainConfig,
        evaluate: EvaluateConfig,
        cache_dir: str | None = None,
    ) -> None:
        import contextlib

        from mllm_msr.config import EngineConfig
        from mllm_msr.engines.vllm import VLLMEngine
        from mllm_msr.recommender.collate import recommender_collator
        from mllm_msr.runtime import local_copy
        from mllm_msr.tiny import resolve_model

        path = resolve_model(model, cache_dir)
        fam = families.resolve(path, train.family, "train.family")
        if fam.multimodal and train.multimodal:
            raise ValueError(
                "evaluate.engine: vllm scores text-only recommenders (train.multimodal: false); "
                f"{model} is multimodal: set evaluate.engine: transformers"
            )
        self.collator = recommender_collator(load_processor(path, fam), train, fam)
        self.yes_no = prompts.answer_token_ids(self.collator.tokenizer)
        self._stack = contextlib.ExitStack()
        self.adapter = self._stack.enter_context(local_copy(adapter)) if adapter else None
        rank = next(r for r in (8, 16, 32, 64, 128, 256) if r >= train.lora.r)
        self.engine = VLLMEngine(
            EngineConfig(
                model=model,
                family=train.family,
                dtype="bfloat16" if evaluate.precision == "bf16" else "float32",
                max_model_len=train.max_length,
                max_num_seqs=evaluate.vllm_max_num_seqs,
                enable_prefix_caching=True,
                cpu_kvcache_space_gib=evaluate.vllm_kvcache_gib,
                enable_lora=adapter is not None,
                max_lora_rank=rank,
                gpu_memory_utilization=0.85,
            ),
            cache_dir,
        )

    def prompt_ids(self, row: dict) -> list[int]:
        enc = self.collator.encode({**row, "label": 1})
        n_prompt = int((enc["labels"][0] != -100).nonzero()[0, 0])
        return enc["input_ids"][0, :n_prompt].tolist()

    def score_rows(self, rows: list[dict]) -> np.ndarray:
        ids = [self.prompt_ids(r) for r in rows]
        seen: set = set()
        first = [
            i
            for i, r in enumerate(rows)
            if not (r.get("user_id") in seen or seen.add(r.get("user_id")))
        ]
        rest = [i for i in range(len(rows)) if i not in set(first)]
        out = np.empty(len(rows), dtype=np.float64)
        for part in (first, rest):
            if part:
                got = self.engine.score_yes_no_token_ids(
                    [ids[i] for i in part], self.yes_no, self.adapter
                )
                out[part] = got
        return out

    def close(self) -> None:
        self.engine.close()
        self._stack.close()

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = self.score_rows(batch.to_pylist())
        keep = batch.select(["user_id", "item_id", "label"])
        return keep.append_column("score", pa.array(scores, pa.float64()))


def score_samples(
    samples: pa.Table,
    model: str,
    adapter: str | None,
    train: TrainConfig,
    evaluate: EvaluateConfig,
    method: str,
    cache_dir: str | None = None,
) -> tuple[pa.Table, dict]:
    """Score SFT samples with Ray Data actors; returns a SCORES table and timing stats.

    ``cache_dir``: where each actor resolves ``model`` (a model under ``s3://`` is synced into
    its node's cache, :func:`mllm_msr.tiny.resolve_model`)."""
    import ray

    from mllm_msr.data.schema import SCORES

    t0 = time.perf_counter()
    pool = evaluate.pool
    if evaluate.engine == "vllm":
        scorer, kwargs = VLLMYesNoScorer, {"evaluate": evaluate}
    else:
        scorer = YesNoScorer
        kwargs = {"precision": evaluate.precision, "share_prefix": evaluate.share_prefix}
    ds = ray.data.from_arrow(samples).map_batches(
        scorer,
        fn_constructor_kwargs={
            "model": model,
            "adapter": adapter,
            "train": train,
            "cache_dir": cache_dir,
            **kwargs,
        },
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        **({"resources": dict(pool.resources)} if pool.resources else {}),
    )
    from mllm_msr.progress import Progress

    parts = []
    progress = Progress("evaluate", total=samples.num_rows, unit="rows")
    for part in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        parts.append(part)
        progress.update(part.num_rows, method=method)
    progress.close()
    scored = pa.concat_tables(parts)
    # Ray Data may reorder blocks: restore the input order (user, candidate).
    order = {
        (u, i): n
        for n, (u, i) in enumerate(
            zip(samples["user_id"].to_pylist(), samples["item_id"].to_pylist())
        )
    }
    idx = np.argsort(
        [
            order[(u, i)]
            for u, i in zip(scored["user_id"].to_pylist(), scored["item_id"].to_pylist())
        ]
    )
    scored = scored.take(pa.array(idx))
    if scored.num_rows != samples.num_rows:
        raise RuntimeError(f"scored {scored.num_rows} of {samples.num_rows} samples")
    table = pa.table(
        {
            "user_id": scored["user_id"],
            "item_id": scored["item_id"],
            "label": scored["label"].cast(pa.int8()),
            "score": scored["score"],
            "method": pa.array([method] * scored.num_rows, pa.string()),
        },
        schema=SCORES,
    )
    seconds = time.perf_counter() - t0
    return table, {"seconds": round(seconds, 2), "rows_per_s": round(table.num_rows / seconds, 2)}
