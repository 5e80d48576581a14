"""The recommender's training loop on each Ray Train worker (one per rank).

:func:`train_loop` is the function Ray Train runs on every rank (the driver is
:func:`mllm_msr.stages.train.run_train`). Its steps live in :class:`_Worker`: build (LoRA-wrap
the model, vision tower and projector frozen unless ``lora.train_vision``; ``deepspeed.initialize``
with the ZeRO config), resume (``ray.train.get_checkpoint()``; a resumed epoch skips the
micro-batches it already trained on), micro-step, validate (loss and AUC on the 1:1 validation
set), checkpoint (every rank saves its shard of the trainable state into a
``ray.train.Checkpoint``) and export (the best or last adapter). Fault injection for tests sits
behind :func:`_fault_hook` and :func:`_maybe_hold`.

The process environment of a rank is set from the loop config by
:func:`mllm_msr.runtime.apply_process_env` (the node's caches; CPU-only settings only without a
GPU) before anything is imported or built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mllm_msr import families
from mllm_msr.config import TrainConfig
from mllm_msr.runtime import RunDir, apply_process_env

ADAPTER_DIR = "adapter"
"""In a checkpoint (and the run directory): the peft adapter folder."""
STATE_FILE = "mllm_msr_state.json"
"""In a checkpoint: step, epoch, losses, validations (survive restarts)."""
BEST_DIR = "best_adapter"
"""In a checkpoint: the adapter of the best validation AUC so far (``train.select_best``)."""


def _load_model(path: str, bf16: bool, fam: families.Family):
    import torch

    model = families.load_model(path, fam, torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    return model


def _frozen_checksum(model) -> float:
    """A checksum of this rank's pieces of the frozen (base) weights."""
    import torch

    from mllm_msr.engines.deepspeed import local_tensor

    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if not p.requires_grad:
            t = local_tensor(p).detach()
            total += (t.double() * (1.0 + t.double().abs())).sum().cpu()
    return float(total)


def build_collator(train: TrainConfig, cache_dir: str):
    """The model's path, family and the recommender collator of ``train``, built before the
    model: a ``train.max_length`` that cannot hold the template, one image and the answer fails
    here, naming the setting. The driver calls it too (:func:`mllm_msr.stages.train.run_train`),
    so such a config fails before Ray Train starts any worker."""
    from mllm_msr.recommender.collate import recommender_collator
    from mllm_msr.tiny import resolve_model

    model_path = resolve_model(train.model, cache_dir)
    fam = families.resolve(model_path, train.family, "train.family")
    processor = families.load_processor(model_path, fam)
    return model_path, fam, recommender_collator(processor, train, fam)


class _Shard:
    """Micro-batches of a Ray Data shard, kept in lock step across ranks.

    Every rank must run the same number of forward passes (ZeRO gathers parameters and reduces
    gradients collectively), so each micro-step all ranks agree whether all of them still have
    a batch.
    """

    def __init__(self, shard, batch_size: int, drop_last: bool = True):
        self.shard = shard
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self):
        import torch.distributed as dist

        batches = self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow", drop_last=self.drop_last
        )
        it = iter(batches)
        while True:
            batch = next(it, None)
            if not _all_reduce([0.0 if batch is None else 1.0], dist.ReduceOp.MIN)[0]:
                return
            yield batch.to_pylist()


def _collective_device():
    """Where small collective tensors live: the GPU under NCCL, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op=None) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _all_mean(values: list[float]) -> tuple[float, int]:
    total, count = _all_reduce([sum(values), float(len(values))])
    return (total / count if count else float("nan")), int(count)


@contextlib.contextmanager
def _private_checkpoint_dir(checkpoint: Any) -> Iterator[str]:
    """The files of a Ray Train checkpoint in a directory of this rank's own (a local checkpoint
    is read where it is). Ray's ``Checkpoint.as_directory`` shares one temporary download among
    the ranks of a node, and a rank that waited for another's download could find it deleted
    already: "Checkpoint directory ... does not exist, even though it should have been created
    by another process" (CI, 2 ranks on one node resuming from S3)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="mllm-msr-resume-") as tmp:
        yield checkpoint.to_directory(tmp)


def _all_gather(obj: Any) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_sum(value: int) -> int:
    return int(_all_reduce([float(value)])[0])


def lr_scheduler_factory(train: TrainConfig, total_steps: int):
    """``optimizer -> scheduler`` for ``train.lr_scheduler`` with ``train.warmup_ratio`` of
    ``total_steps`` as linear warmup (``transformers.get_scheduler``)."""
    from transformers import get_scheduler

    warmup = int(round(train.warmup_ratio * total_steps))
    name = train.lr_scheduler
    if name == "constant" and warmup:
        name = "constant_with_warmup"

    def build(optimizer):
        return get_scheduler(
            name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1)
        )

    return build


def _fault_hook(config: dict):
    """The fault-injection hook of ``config["fail_once"]`` (tests): called after every optimizer
    step with ``(rank, world, step)``; the last rank's process exits once at that step (a flag
    file in the run directory makes it once), as on a lost node or an OOM kill."""
    fail = config.get("fail_once")
    if not fail:
        return None

    def hook(rank: int, world: int, step: int) -> None:
        if rank != world - 1 or step != fail["step"]:
            return
        flag_run = RunDir(fail["run"])  # any run directory, local or object storage
        if not flag_run.exists(fail["flag"]):
            flag_run.write_json(fail["flag"], {"step": step})
            # Ray Train registers a checkpoint only once its controller has polled every rank's
            # report (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a death within that window loses
            # the newest checkpoint, and the run restarts from the one before. Dying 1 s later
            # makes the resume point deterministic: the last checkpoint before this step.
            time.sleep(1.0)
            print(f"[train] rank {rank}: injected worker death at step {step}")
            os._exit(1)

    return hook


PHASES = ("data", "collate", "forward", "backward", "optimizer")
"""Where a worker's step time goes (``state["phase_seconds"]``, summed over micro-batches)."""


class _Worker:
    """One rank's training: :meth:`build` (model, LoRA, DeepSpeed engine, collator),
    :meth:`resume` (the latest Ray Train checkpoint), :meth:`micro_step` (one micro-batch),
    :meth:`validate` (loss and AUC on the 1:1 validation set), :meth:`checkpoint` and
    :meth:`export` (the peft adapter: the last one, or the best-validated one)."""

    def __init__(self, config: dict):
        import ray.train

        self.config = config
        self.train: TrainConfig = config["train"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.fault = _fault_hook(config)
        self.phase = dict.fromkeys(PHASES, 0.0)
        self.best_dir = Path(tempfile.mkdtemp(prefix="mllm_msr_best_"))
        """This rank's copy of the best-validated adapter (rank 0 writes it)."""
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "epoch_step": 0,
            "losses": [],
            "shortened": 0,
            "attempts": 0,
            "resumed_from": [],
            "fingerprint": config["fingerprint"],
            "validations": [],
            "best": None,
            "stale_validations": 0,
        }

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        import torch

        from mllm_msr import prompts
        from mllm_msr.engines import deepspeed as ds
        from mllm_msr.engines import peft as lora

        train = self.train
        torch.manual_seed(train.seed)
        model_path, fam, self.collator = build_collator(train, self.config["cache_dir"])
        model = lora.apply_lora(_load_model(model_path, ds.use_bf16(train), fam), train.lora, fam)
        torch.manual_seed(train.seed + self.rank)  # dropout differs per rank
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())
        scheduler = lr_scheduler_factory(train, self.config["total_steps"])
        self.engine = ds.initialize(model, train, self.world, lr_scheduler=scheduler)
        self.frozen_before = _frozen_checksum(self.engine.module)
        self.yes_id, self.no_id = prompts.answer_token_ids(self.collator.tokenizer)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        import shutil

        import ray
        import ray.train

        from mllm_msr.engines import deepspeed as ds

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with _private_checkpoint_dir(checkpoint) as d:
                saved = json.loads((Path(d) / STATE_FILE).read_text())
                if saved["fingerprint"] != self.state["fingerprint"]:
                    raise ValueError(
                        "checkpoint in the run's train/ folder was made with "
                        f"{saved['fingerprint']}, not {self.state['fingerprint']}: rerun with "
                        "--force train"
                    )
                ds.load_checkpoint(self.engine, d)
                if (Path(d) / BEST_DIR).is_dir():
                    shutil.rmtree(self.best_dir)
                    shutil.copytree(Path(d) / BEST_DIR, self.best_dir)
            self.state.update(saved)
            self.state["resumed_from"].append(self.state["step"])
        self.state["attempts"] += 1
        # the Ray node of every rank, per attempt (a restart after a lost node runs elsewhere)
        node = ray.get_runtime_context().get_node_id()
        self.state.setdefault("nodes", []).append(_all_gather(node))

    # ------------------------------------------------------------------ step
    def micro_step(self, rows: list[dict], t_fetch: float) -> tuple[float, bool]:
        """Forward, backward and (at an accumulation boundary) optimizer step on one
        micro-batch; returns the loss and whether an optimizer step happened."""
        clock = time.perf_counter
        t0 = clock()
        self.phase["data"] += t0 - t_fetch
        batch = {k: v.to(self.engine.device) for k, v in self.collator(rows).items()}
        t1 = clock()
        loss = answer_loss(self.engine, batch)
        t2 = clock()
        self.engine.backward(loss)
        t3 = clock()
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        t4 = clock()
        for name, dt in zip(PHASES[1:], (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.phase[name] += dt
        return float(loss.detach()), boundary

    def after_step(self) -> None:
        if self.fault is not None:
            self.fault(self.rank, self.world, self.state["step"])

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict | None:
        """Mean answer loss and AUC of p(Yes)/(p(Yes)+p(No)) over the ``val`` shards (1:1:
        one positive and one sampled negative per validation user); collective. Records the
        result, and with ``train.select_best`` keeps the adapter of the best AUC."""
        import ray.train
        import torch

        from mllm_msr.metrics import auc

        if not self.config["has_val"]:
            return None
        self.engine.eval()
        losses, scored = [], []
        with torch.no_grad():
            for rows in _Shard(
                ray.train.get_dataset_shard("val"), self.train.micro_batch_size, drop_last=False
            ):
                batch = {k: v.to(self.engine.device) for k, v in self.collator(rows).items()}
                loss, scores = answer_loss_and_scores(self.engine, batch, self.yes_id, self.no_id)
                losses.append(float(loss))
                scored += [(float(s), int(r["label"])) for s, r in zip(scores, rows)]
        self.engine.train()
        val_loss, _ = _all_mean(losses)
        pairs = [p for part in _all_gather(scored) for p in part]
        labels = np.array([lab for _, lab in pairs])
        value = (
            float(auc(labels, np.array([s for s, _ in pairs])))
            if 0 < labels.sum() < len(labels)
            else float("nan")
        )
        result = {
            "step": self.state["step"],
            "loss": None if math.isnan(val_loss) else round(val_loss, 6),
            "auc": None if math.isnan(value) else round(value, 6),
            "rows": len(pairs),
        }
        self.state["validations"].append(result)
        best = self.state["best"]
        if result["auc"] is not None and (best is None or result["auc"] > best["auc"]):
            self.state["best"] = result
            self.state["stale_validations"] = 0
            if self.train.select_best:
                import shutil

                shutil.rmtree(self.best_dir, ignore_errors=True)
                _export_adapter(self.engine, self.train, self.best_dir, self.rank)
        else:
            self.state["stale_validations"] += 1
        return result

    def should_stop(self) -> bool:
        patience = self.train.early_stopping_patience
        return bool(patience) and self.state["stale_validations"] >= patience

    # ------------------------------------------------------------------ checkpoint / export
    def checkpoint(self, final: bool, metrics: dict) -> None:
        """Every rank saves its shard into one ``ray.train.Checkpoint`` (collective); the
        final one also holds the exported adapter (:meth:`export`)."""
        import shutil

        import ray.train

        from mllm_msr.engines import deepspeed as ds

        state = self.state
        state["shortened"] += _all_sum(self.collator.shortened)  # collective: every rank saves
        self.collator.shortened = 0
        state["phase_seconds"] = {k: round(v, 3) for k, v in self.phase.items()}
        with tempfile.TemporaryDirectory() as tmp:
            ds.save_checkpoint(self.engine, tmp, client_state={})
            if final:
                self.export(Path(tmp) / ADAPTER_DIR)
            if self.rank == 0:
                if (self.best_dir / "adapter_config.json").exists():
                    shutil.copytree(self.best_dir, Path(tmp) / BEST_DIR)
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def export(self, out: Path) -> None:
        """The adapter to ship: the best-validated one (``train.select_best``, when a
        validation ran), else the last weights (collective)."""
        import shutil

        best = self.state.get("best")
        use_best = self.train.select_best and best is not None
        self.state["exported_step"] = best["step"] if use_best else self.state["step"]
        if use_best:
            if self.rank == 0:
                shutil.copytree(self.best_dir, out)
        else:
            _export_adapter(self.engine, self.train, out, self.rank)

    def finish(self, step_times: list[float]) -> None:
        """The final statistics (collective)."""
        from mllm_msr.engines import deepspeed as ds

        self.state["rank_state_bytes"] = _all_gather(ds.rank_state_bytes(self.engine))
        last = self.state["validations"][-1] if self.state["validations"] else None
        if last is None or last["step"] != self.state["step"]:
            last = self.validate()
        self.state["val_loss"] = last["loss"] if last else None
        self.state["val_auc"] = last["auc"] if last else None
        self.state.update(
            frozen_unchanged=_all_sum(
                int(_frozen_checksum(self.engine.module) != self.frozen_before)
            )
            == 0,
            trainable_params=self.trainable,
            total_params=self.total,
        )
        if step_times:
            self.state["step_seconds"] = _median(step_times)


def length_bucketed(pools, batch_size: int, seed: int):
    """Micro-batches of similar lengths: each pool of rows (a list of dicts; ``length_bucket``
    micro-batches' worth, in the shard's order) is sorted by :func:`row_length` and cut into
    micro-batches of ``batch_size`` (an incomplete last one is dropped), taken in a seeded
    shuffled order. Deterministic, so a resumed epoch skips the same micro-batches."""
    rng = np.random.default_rng(seed)
    for pool in pools:
        rows = sorted(pool, key=row_length)
        chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        chunks = [c for c in chunks if len(c) == batch_size]
        for k in rng.permutation(len(chunks)):
            yield chunks[k]


def _length_batches(shard, batch_size: int, bucket: int, seed: int):
    """The training micro-batches of a Ray Data shard (:func:`length_bucketed` when
    ``bucket > 1``), kept in lock step across ranks like :class:`_Shard`."""
    import torch.distributed as dist

    if bucket <= 1:
        yield from _Shard(shard, batch_size)
        return
    pools = (
        b.to_pylist()
        for b in shard.iter_batches(
            batch_size=batch_size * bucket, batch_format="pyarrow", drop_last=False
        )
    )
    it = length_bucketed(pools, batch_size, seed)
    while True:
        batch = next(it, None)
        if not _all_reduce([0.0 if batch is None else 1.0], dist.ReduceOp.MIN)[0]:
            return
        yield batch


def row_length(row: dict) -> int:
    """A sample's text length (characters of what the prompt shows), for length batching."""
    return sum(len(row.get(k) or "") for k in ("preference", "title", "summary")) + sum(
        len(t or "") for t in row.get("history_titles") or []
    )


def train_loop(config: dict) -> dict | None:
    """Ray Train worker function (one per rank): build, resume, then epochs of micro-steps with
    validation, checkpoints and the final export."""
    import ray.train

    t_start = time.perf_counter()
    train: TrainConfig = config["train"]
    # this rank's process settings (caches; CPU-only ones only without a GPU), from the config
    apply_process_env(config["cache_dir"])
    worker = _Worker(config)
    worker.build()
    worker.resume()
    state, engine, rank, world = worker.state, worker.engine, worker.rank, worker.world
    total_steps, per_epoch = config["total_steps"], config["steps_per_epoch"]
    eval_every = train.eval_every or per_epoch
    from mllm_msr.progress import Progress
    from mllm_msr.telemetry import Telemetry, learning_rate

    telemetry = Telemetry(
        config.get("tensorboard") if rank == 0 else None,
        run_name=config["run_name"],
        params=dataclasses.asdict(train),
    )
    samples_per_step = train.micro_batch_size * train.grad_accum_steps * world
    window: list[float] = []
    step_times: list[float] = []
    # Rank 0 prints the progress line (Ray Train's report() reprs stay quiet, mllm_msr.console).
    progress = Progress(
        "train", total=total_steps, unit="steps", initial=state["step"], clock=time.perf_counter
    )
    engine.train()
    cap = per_epoch * train.grad_accum_steps  # micro-batches per rank per epoch
    stopped = worker.should_stop()
    t_step = time.perf_counter()
    while state["step"] < total_steps and not stopped:
        skip = state["epoch_step"] * train.grad_accum_steps  # trained before a resume
        batches = _length_batches(
            ray.train.get_dataset_shard("train"),
            train.micro_batch_size,
            train.length_bucket,
            seed=train.seed + 1000 * state["epoch"] + rank,
        )
        t_fetch = time.perf_counter()
        for micro, rows in enumerate(batches):
            if state["step"] >= total_steps or stopped:
                break  # every rank reaches the last step (or the early stop) together
            if micro < skip or micro >= cap:  # every rank drains its shard in lock step
                t_fetch = time.perf_counter()
                continue
            loss, boundary = worker.micro_step(rows, t_fetch)
            window.append(loss)
            t_fetch = time.perf_counter()
            if not boundary:
                continue
            state["step"] += 1
            state["epoch_step"] += 1
            mean_loss, _ = _all_mean(window)
            window.clear()
            state["losses"].append([state["step"], round(mean_loss, 6)])
            now = time.perf_counter()
            step_times.append(now - t_step)
            lr = learning_rate(engine)  # for the next step (the scheduler has stepped)
            state.setdefault("learning_rates", []).append([state["step"], lr])
            telemetry.log(
                state["step"],
                **{
                    "train/loss": mean_loss,
                    "train/learning_rate": lr,
                    "train/samples_per_s": samples_per_step / max(now - t_step, 1e-9),
                },
            )
            t_step = now
            state.setdefault("startup_seconds", round(now - t_start - step_times[0], 2))
            if rank == 0:
                if len(step_times) == 1:  # the rate counts from the first step, not startup
                    progress.start, progress.initial = now, state["step"]
                rate = progress.rate(now)
                progress.set(
                    state["step"],
                    loss=round(mean_loss, 4),
                    **{"samples/s": round(rate * samples_per_step, 2) if rate else "?"},
                )
            worker.after_step()
            last = state["step"] >= total_steps
            if state["step"] % eval_every == 0 and not last:
                result = worker.validate()
                if result is not None:
                    telemetry.log(state["step"], **{"val/loss": result["loss"]})
                    telemetry.log(state["step"], **{"val/auc": result["auc"]})
                stopped = worker.should_stop()
                if stopped and rank == 0:
                    print(f"[train] early stop at step {state['step']}: best {state['best']}")
            last = last or stopped
            if last or state["step"] % train.checkpoint_every == 0:
                if last:
                    worker.finish(step_times)
                    telemetry.log(state["step"], **{"val/loss": state.get("val_loss")})
                telemetry.flush()
                worker.checkpoint(
                    final=last,
                    metrics={"step": state["step"], "epoch": state["epoch"], "loss": mean_loss},
                )
                _maybe_hold(config.get("hold"), state["step"], rank)
                t_step = time.perf_counter()
            elif state["step"] % train.log_every == 0:
                ray.train.report({"step": state["step"], "loss": mean_loss})
            t_fetch = time.perf_counter()
        if state["step"] < total_steps or state["epoch_step"] >= per_epoch:
            state["epoch"] += 1
            state["epoch_step"] = 0
    if state["resumed_from"] and not step_times and (state["step"] >= total_steps or stopped):
        # Resumed an already finished run: write the final checkpoint (adapter, state) again.
        worker.finish(step_times)
        worker.checkpoint(final=True, metrics={"step": state["step"], "epoch": state["epoch"]})
    telemetry.close()
    return state if rank == 0 else None


def _maybe_hold(hold: dict | None, step: int, rank: int) -> None:
    """Fault-injection point (tests): after the step-``hold['step']`` checkpoint, rank 0 writes
    the hold flag once and waits, so that a test removes the node while training runs."""
    if not hold or rank != 0 or step != hold["step"]:
        return
    flag_run = RunDir(hold["run"])
    if flag_run.exists(hold["flag"]):
        return
    flag_run.write_json(hold["flag"], {"step": step, "pid": os.getpid()})
    print(f"[train] holding after the step-{step} checkpoint ({hold['seconds']:g} s)", flush=True)
    time.sleep(hold["seconds"])


def answer_loss(model, batch: dict):
    """The training loss (mean cross-entropy over supervised tokens), logits at those only.

    Equal to ``model(**batch).loss`` (transformers' causal-LM loss: labels shifted by one,
    ``-100`` ignored, fp32 logits), but the vocabulary projection runs only at the positions
    whose next token is supervised in some row of the batch (``logits_to_keep`` with a tensor
    of positions), instead of at every position: the answer is 2-3 tokens of a ~250-token
    sample, and for a small model with a large vocabulary (SmolLM2: 49k x 576) the projection
    is a fifth of the forward and backward FLOPs.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]
    keep = (target != -100).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return model(**batch).loss  # nothing supervised: let the model say what it does
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.shape[1] != keep.numel():  # a model that ignores logits_to_keep
        logits = logits[:, keep]
    picked = target[:, keep].to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1), ignore_index=-100
    )


def answer_loss_and_scores(model, batch: dict, yes_id: int, no_id: int):
    """:func:`answer_loss` and, per row, ``p(yes) / (p(yes) + p(no))`` at the first answer
    token (the score the evaluate stage reads), from one forward pass."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]
    supervised = target != -100
    keep = supervised.any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.shape[1] != keep.numel():
        logits = logits[:, keep]
    picked = target[:, keep].to(logits.device)
    logits = logits.float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), picked.reshape(-1), ignore_index=-100
    )
    first = supervised.int().argmax(dim=1)  # the position predicting the first answer token
    column = torch.searchsorted(keep, first.to(keep.device))
    rows = torch.arange(labels.shape[0], device=logits.device)
    at = logits[rows, column.to(logits.device)]
    pair = torch.stack([at[:, yes_id], at[:, no_id]], dim=1)
    return loss, torch.softmax(pair, dim=1)[:, 0].cpu().tolist()


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 4) if values else None


def _export_adapter(engine, train: TrainConfig, out: Path, rank: int) -> None:
    """Gather the LoRA weights (collective under ZeRO-3) and save a peft folder on rank 0."""
    from mllm_msr.engines import deepspeed as ds
    from mllm_msr.engines import peft as lora

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with ds.gathered([p for _, p in named], train.zero.stage):
        if rank == 0:
            state_dict = {n: p.detach().float().cpu().clone() for n, p in named}
            lora.save_adapter(engine.module, out, state_dict=state_dict)
