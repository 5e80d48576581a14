"""Recommender fine-tuning: Ray Train ``TorchTrainer`` + DeepSpeed ZeRO + peft LoRA.

Driver (:func:`run_train`): builds the SFT samples (:mod:`mllm_msr.recommender.samples`) from the run
directory's tables, hands them to Ray Train as Ray Data datasets (``train`` split across workers,
``val``: the 1:1 validation set of :func:`validation_pairs`), runs the trainer, copies the final adapter to
``<run_dir>/adapter/`` (a peft folder; merged full weights to ``<run_dir>/merged/`` when
``train.merge_adapter``) and writes the stage marker.

Workers (:func:`mllm_msr.recommender.train_loop.train_loop`: build, resume, micro-step, validate,
checkpoint, export; fault injection behind a hook): LoRA-wrap the model (vision tower + projector frozen unless
``lora.train_vision``), ``deepspeed.initialize`` with the ZeRO config, and loop over their data
shard. Every ``checkpoint_every`` optimizer steps and at the end every rank saves its shard of the
trainable state (DeepSpeed checkpoint, frozen base weights excluded) into a
``ray.train.Checkpoint``. Resume is Ray Train's: the run lives in ``<run_dir>/train/`` under a
fixed name, so re-running (after a crash, or with a larger ``max_steps``) continues from the latest
checkpoint (``ray.train.get_checkpoint()``), and ``FailureConfig(max_failures)`` restarts a run
whose worker died from its last checkpoint. A resumed epoch skips the micro-batches it already
trained on. The learning rate follows ``train.lr_scheduler`` after ``train.warmup_ratio`` of
the steps of warmup. Every ``train.eval_every`` steps (default: every epoch) and at the end the
ranks compute the validation loss and AUC; ``train.select_best`` exports the adapter of the best
AUC (kept in every checkpoint, so it survives restarts), ``train.early_stopping_patience`` stops
after that many validations without improvement.

Loss history, step count and the number of shortened samples live in the checkpoint, so they
survive restarts; the stage summary reports them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mllm_msr.config import PipelineConfig, TrainConfig
from mllm_msr.recommender.train_loop import ADAPTER_DIR, STATE_FILE, build_collator, train_loop
from mllm_msr.runtime import RunDir, init_ray, node_cache_dir

RUN_NAME = "recommender"
"""Ray Train run name under ``<run_dir>/train/`` (fixed, so re-running resumes)."""
MERGED_DIR = "merged"
FINGERPRINT_FILE = "train/fingerprint.json"
"""What the checkpoints under ``train/`` were trained on (see :func:`checkpoint_fingerprint`)."""
HOLD_ENV = "MLLM_MSR_TRAIN_HOLD_AT_STEP"
HOLD_FLAG = "train/_hold"
"""Fault injection (tests): rank 0 waits after that step's checkpoint (:func:`_maybe_hold`)."""
TENSORBOARD_DIR = "train/tensorboard"
"""TensorBoard event files of rank 0 (:mod:`mllm_msr.telemetry`)."""
RESUMABLE_KEYS = ("max_steps", "log_every", "checkpoints_to_keep", "max_failures", "merge_adapter")
"""Train settings a checkpoint may be resumed under when they change (``max_steps``: a rerun
with more steps continues training)."""


# =========================================================================== driver


def _optional_table(run: RunDir, name: str, columns: list[str] | None = None) -> pa.Table | None:
    return run.read_table(name, columns=columns) if run.table_files(name) else None


def load_samples(cfg: PipelineConfig, run: RunDir) -> tuple[pa.Table, pa.Table, dict]:
    """SFT samples of the train and val splits from the run directory's tables."""
    from mllm_msr.recommender.samples import build_sft_samples

    return build_sft_samples(
        candidates=run.read_table("candidates"),
        sequences=run.read_table("sequences"),
        items=run.read_table("items", columns=["item_id", "title", "images"]),
        item_summaries=_optional_table(run, "item_summaries", ["item_id", "summary"]),
        preferences=_optional_table(run, "preferences"),
        splits=("train", "val"),
        missing_preference=cfg.train.missing_preference,
    )


def steps_per_epoch(train: TrainConfig, n_train: int) -> int:
    """Optimizer steps one pass over ``n_train`` samples gives (every rank the same count)."""
    per_rank = n_train // train.num_workers
    return per_rank // train.micro_batch_size // train.grad_accum_steps


def total_steps(train: TrainConfig, n_train: int) -> int:
    if train.max_steps > 0:
        return train.max_steps
    return train.epochs * steps_per_epoch(train, n_train)


def table_digest(table: pa.Table) -> str:
    """SHA-256 of a table's contents (Arrow IPC stream of its rows, in order)."""
    import hashlib

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def checkpoint_fingerprint(train: TrainConfig, samples: pa.Table) -> str:
    """What a checkpoint must agree on to be resumed: every train setting that shapes the
    weights (model, LoRA, learning rate, epochs, batch sizes, seeds, ZeRO stage, workers, ...)
    and a hash of the SFT samples."""
    import hashlib

    settings = {k: v for k, v in dataclasses.asdict(train).items() if k not in RESUMABLE_KEYS}
    blob = json.dumps({"train": settings, "samples": table_digest(samples)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def validation_pairs(val_rows: pa.Table, seed: int, max_rows: int) -> pa.Table:
    """The 1:1 validation set: per validation user (sorted), the positive and one of its
    negatives drawn with ``seed``; at most ``max_rows`` rows (whole pairs). A validation AUC on
    it measures ranking, where a 1:20 validation loss mostly measures the "No" prior."""
    if val_rows.num_rows == 0 or max_rows < 2:
        return val_rows.slice(0, 0)
    rng = np.random.default_rng(seed)
    users = val_rows["user_id"].to_pylist()
    labels = val_rows["label"].to_pylist()
    pos: dict[str, int] = {}
    neg: dict[str, list[int]] = {}
    for i, (u, lab) in enumerate(zip(users, labels)):
        if lab:
            pos.setdefault(u, i)
        else:
            neg.setdefault(u, []).append(i)
    take: list[int] = []
    for u in sorted(pos):
        if u in neg and len(take) + 2 <= max_rows:
            take += [pos[u], neg[u][int(rng.integers(len(neg[u])))]]
    return val_rows.take(pa.array(take, pa.int64()))


def _shuffled(table: pa.Table, seed: int) -> pa.Table:
    import numpy as np

    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def run_train(
    cfg: PipelineConfig,
    run: RunDir,
    *,
    fresh: bool = False,
    fail_once_at_step: int | None = None,
    log=print,
) -> dict:
    """Fine-tune the recommender; returns the stage summary (also the stage marker).

    ``fresh`` deletes earlier checkpoints of this run first. Otherwise training resumes from
    the latest checkpoint only when it was made from the same samples and settings
    (:func:`checkpoint_fingerprint`); checkpoints of anything else are removed and training
    starts over. The exported adapter of an earlier run stays until the new one replaces it.
    ``fail_once_at_step`` is fault injection for tests: the last rank's process exits once
    when it reaches that optimizer step (a flag file in the run directory makes it once), and
    ``FailureConfig`` restarts the run from the last checkpoint. With the environment variable
    ``MLLM_MSR_TRAIN_HOLD_AT_STEP=N`` (tests: a node removed while training runs), rank 0 writes
    ``train/_hold`` once after the step-N checkpoint and waits up to ``MLLM_MSR_TRAIN_HOLD_S``
    (60) seconds before going on.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from mllm_msr import console

    t0 = time.perf_counter()
    train = cfg.train
    cache_dir = node_cache_dir(cfg.cache_dir)  # each rank sets its process env from it
    # The one driver-side setting (DESIGN §3): Ray Train's controller polls its workers this
    # often; ray.train.report blocks ~1.8 s without it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    from mllm_msr.model_source import is_source

    if not is_source(train.model):  # on object storage: each rank's node syncs it, not the driver
        build_collator(train, cache_dir)  # a max_length that cannot hold an image fails here
    samples, quarantined, stats = load_samples(cfg, run)
    run.remove("quarantine/train")
    if quarantined.num_rows:
        run.write_table("quarantine/train", quarantined)
    ckpt_fp = checkpoint_fingerprint(train, samples)
    previous = run.read_json(FINGERPRINT_FILE) if run.exists(FINGERPRINT_FILE) else None
    if fresh or (run.exists("train") and (previous or {}).get("fingerprint") != ckpt_fp):
        why = "forced" if fresh else "they were trained on other samples or settings"
        if run.exists("train"):
            log(f"[train] starting fresh: removing earlier checkpoints ({why})")
        run.remove("train")
    run.write_json(FINGERPRINT_FILE, {"fingerprint": ckpt_fp})
    train_rows = samples.filter(pc.equal(samples["split"], "train"))
    val_rows = samples.filter(pc.equal(samples["split"], "val"))
    n_steps = total_steps(train, train_rows.num_rows)
    per_epoch = steps_per_epoch(train, train_rows.num_rows)
    if per_epoch < 1:
        raise ValueError(
            f"{train_rows.num_rows} train samples are too few for {train.num_workers} workers x "
            f"micro batch {train.micro_batch_size} x {train.grad_accum_steps} accumulation steps"
        )
    log(
        f"[train] {stats['samples']} samples ({stats['per_split']}), {n_steps} steps, "
        f"{stats['fallback_users']} users without preference -> titles"
    )

    init_ray(
        cfg.ray.address,
        cfg.ray.num_cpus,
        cfg.ray.object_store_memory,
        hf_hub_offline=cfg.hf_hub_offline,
    )
    datasets = {"train": ray.data.from_arrow(_shuffled(train_rows, train.seed))}
    val_pairs = validation_pairs(val_rows, train.seed, train.eval_samples)
    eval_rows = val_pairs.num_rows - val_pairs.num_rows % train.num_workers
    if eval_rows >= train.num_workers and eval_rows >= 2:
        datasets["val"] = ray.data.from_arrow(val_pairs.slice(0, eval_rows))

    loop_config = {
        "train": train,
        "cache_dir": cache_dir,
        "total_steps": n_steps,
        "has_val": "val" in datasets,
        "steps_per_epoch": per_epoch,
        "fingerprint": ckpt_fp,
        "tensorboard": run.uri_of(TENSORBOARD_DIR),
        "run_name": cfg.name,
        "hold": None
        if not os.environ.get(HOLD_ENV)
        else {
            "step": int(os.environ[HOLD_ENV]),
            "run": run.uri,
            "flag": HOLD_FLAG,
            "seconds": float(os.environ.get("MLLM_MSR_TRAIN_HOLD_S", "60")),
        },
        "fail_once": None
        if fail_once_at_step is None
        else {"step": fail_once_at_step, "run": run.uri, "flag": "train/_injected_failure"},
    }
    resources = {"CPU": train.cpus_per_worker, **train.resources_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            # The run directory's own filesystem (S3: endpoint and credentials from the AWS_*
            # environment, see mllm_msr.runtime), so checkpoints land where the tables are.
            storage_path=run.path("train"),
            storage_filesystem=run.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            # the controller's and workers' ray.train logs: WARNING unless --log-level DEBUG
            logging_config=ray.train.LoggingConfig(log_level=console.engine_level()),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    with result.checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        _export_portable_adapter(Path(ckpt_dir) / ADAPTER_DIR, run, cfg, state, stats)
        merged = None
        if train.merge_adapter:
            from mllm_msr.engines.peft import merge_adapter
            from mllm_msr.tiny import resolve_model

            with tempfile.TemporaryDirectory() as tmp:
                out = merge_adapter(
                    resolve_model(train.model, cache_dir),
                    Path(ckpt_dir) / ADAPTER_DIR,
                    Path(tmp) / "m",
                    family=train.family,
                )
                _upload_dir(out, run, MERGED_DIR)
            merged = run.uri_of(MERGED_DIR)

    losses = state["losses"]
    summary = {
        "rows_in": stats["rows_in"],
        "rows_out": stats["samples"],
        "quarantined": stats["quarantined"],
        "samples": stats["per_split"],
        "fallback_users": stats["fallback_users"],
        "without_image": stats["without_image"],
        "steps": state["step"],
        "epochs_done": state["epoch"],
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "val_loss": state.get("val_loss"),
        "val_auc": state.get("val_auc"),
        "validations": state.get("validations"),
        "best_validation": state.get("best"),
        "exported_step": state.get("exported_step"),
        "phase_seconds": state.get("phase_seconds"),
        "learning_rates": state.get("learning_rates"),
        "shortened": state["shortened"],
        "attempts": state["attempts"],
        "nodes": state.get("nodes"),
        "resumed_from_steps": state["resumed_from"],
        "step_seconds": state.get("step_seconds"),
        "startup_seconds": state.get("startup_seconds"),
        "frozen_unchanged": state.get("frozen_unchanged"),
        "rank_state_bytes": state.get("rank_state_bytes"),
        "trainable_params": state.get("trainable_params"),
        "total_params": state.get("total_params"),
        "zero_stage": train.zero.stage,
        "num_workers": train.num_workers,
        "adapter": run.uri_of(ADAPTER_DIR),
        "merged": merged,
        "checkpoint": result.checkpoint.path,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(
        f"[train] {summary['steps']} steps, loss {summary['first_loss']} -> "
        f"{summary['final_loss']}, {summary['seconds']} s"
    )
    return summary


def _export_portable_adapter(
    adapter: Path, run: RunDir, cfg: PipelineConfig, state: dict, stats: dict
) -> None:
    """Copy the checkpoint's adapter to ``<run_dir>/adapter/`` with the base model named by
    ``train.model`` (not this machine's path) and a filled model card."""
    import shutil

    from mllm_msr.adapter_card import finalize_adapter

    losses = state["losses"]
    card_facts = {
        "samples": stats["per_split"],
        "fallback_users": stats["fallback_users"],
        "steps": state["step"],
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "val_loss": state.get("val_loss"),
        "val_auc": state.get("val_auc"),
        "exported_step": state.get("exported_step"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / ADAPTER_DIR
        shutil.copytree(adapter, local)
        finalize_adapter(local, cfg, card_facts)
        _upload_dir(local, run, ADAPTER_DIR)


def _upload_dir(local: Path, run: RunDir, rel: str) -> None:
    """Replace ``<run_dir>/<rel>`` with the contents of the local folder ``local``."""
    run.remove(rel)
    run.makedirs(rel)
    pafs.copy_files(
        str(local),
        run.path(rel),
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=run.fs,
    )
