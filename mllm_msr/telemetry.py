"""Training telemetry: TensorBoard event files (tensorboardX), and MLflow when it is installed.

Rank 0 of the train stage logs, per optimizer step, the training loss, the learning rate and the
throughput (samples/s), and the validation loss at the end, into
``<run_dir>/train/tensorboard/`` (``tensorboard --logdir runs/<name>/train/tensorboard``). For a
run directory on a remote filesystem (``s3://...``) the events are written to a local temporary
folder and uploaded when training ends (:meth:`Telemetry.close`).

MLflow: when ``mlflow`` is importable and ``MLFLOW_TRACKING_URI`` is set, the same scalars go to
an MLflow run named after the pipeline run (without the tracking URI, MLflow would write an
``mlruns/`` folder in whatever directory the worker runs in).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class Telemetry:
    """Scalar logging to TensorBoard (and MLflow); a no-op when ``dest`` is None."""

    def __init__(self, dest: str | None, run_name: str = "train", params: dict | None = None):
        self.dest = dest
        self._writer = None
        self._tmp: str | None = None
        self._mlflow: Any = None
        if dest is None:
            return
        from tensorboardX import SummaryWriter

        if "://" in dest:
            self._tmp = tempfile.mkdtemp(prefix="mmsr-tb-")
            logdir = self._tmp
        else:
            Path(dest).mkdir(parents=True, exist_ok=True)
            logdir = dest
        self._writer = SummaryWriter(logdir=logdir)
        self._mlflow = _start_mlflow(run_name, params or {})

    def log(self, step: int, **scalars: float | None) -> None:
        for name, value in scalars.items():
            if value is None or value != value:  # None or NaN
                continue
            if self._writer is not None:
                self._writer.add_scalar(name, float(value), step)
            if self._mlflow is not None:
                try:
                    self._mlflow.log_metric(name.replace("/", "_"), float(value), step=step)
                except Exception:  # a tracking server hiccup must not stop training
                    pass

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush, close, and upload the events of a remote run directory."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if self._mlflow is not None:
            try:
                self._mlflow.end_run()
            except Exception:
                pass
        if self._tmp is not None and self.dest is not None:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(self.dest)
            fs.create_dir(root, recursive=True)
            pafs.copy_files(
                self._tmp, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )
            shutil.rmtree(self._tmp, ignore_errors=True)


def _start_mlflow(run_name: str, params: dict) -> Any:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    try:
        import mlflow  # optional: not a dependency of the project
    except ImportError:
        return None
    try:
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in params.items()})
    except Exception:
        return None
    return mlflow


def learning_rate(engine) -> float | None:
    """The current learning rate of a DeepSpeed engine (its first parameter group)."""
    try:
        return float(engine.get_lr()[0])
    except Exception:
        try:
            return float(engine.optimizer.param_groups[0]["lr"])
        except Exception:
            return None
