"""What the console shows: the project's own lines, engines and Ray only when they warn.

Two levels (``--log-level`` on every job, :func:`configure`):

* ours (``mllm_msr`` loggers; the ``[stage] ...`` lines are printed whatever the level) -- the
  level given, INFO by default;
* engines and Ray (``ray``, ``ray.data``, ``ray.train``, vLLM, transformers, DeepSpeed, torch) --
  WARNING, or DEBUG when ours is DEBUG (``--log-level DEBUG`` shows everything).

The driver sets them here; Ray workers and actors get them through the runtime env
(:func:`worker_env` and :func:`setup_worker`, the ``worker_process_setup_hook`` that
:func:`mllm_msr.runtime.init_ray` installs). Known repeated, harmless warnings are dropped at
their source (:data:`NOISE`); Ray Data prints no progress blocks (the stages print their own
progress lines, :mod:`mllm_msr.progress`).

:func:`is_project_line` is the one definition of "a line of ours": after Ray's worker prefix
(``(RayTrainWorker pid=12) ``), it starts with ``[<tag>]`` for a tag of :data:`PROJECT_TAGS`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

ENV_LEVEL = "MLLM_MSR_LOG_LEVEL"
"""Our level; the engines' level follows from it (:func:`engine_level`)."""

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

STAGE_TAGS = ("ingest", "prepare", "item_summaries", "user_preferences", "train", "evaluate")
PROJECT_TAGS = (
    *STAGE_TAGS,
    "pipeline",
    "lease",
    "watchdog",
    "mllm-msr",
    "engines.vllm",
    "engines.deepspeed",
    "engines.peft",
    "preferences",
    "items",
    "scores",
)
"""``[tag]`` prefixes of the project's console lines (stages, tables, our loggers)."""

ENGINE_LOGGERS = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray.serve",
    "vllm",
    "transformers",
    "DeepSpeed",
    "deepspeed",
    "torch",
    "peft",
    "accelerate",
    "filelock",
    "urllib3",
    "httpx",
    "huggingface_hub",
    "PIL",
)

NOISE: dict[str, tuple[str, ...]] = {
    # every DeepSpeed import on a CPU host (train.use_gpu=false): not news
    "DeepSpeed": ("Setting accelerator to CPU",),
    # we turn Ray Data's progress blocks off on purpose (the stages print their own progress)
    "ray.data._internal.progress": ("Progress bars disabled",),
    # the cleaner asks the State API (dashboard) every second; without a dashboard it fails
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",
    ),
}
"""Logger name -> message fragments dropped at that logger (repeated, harmless)."""

VLLM_NOTES = (
    "doesn't allow to use `torch.set_num_threads`",  # once per engine step on CPU
    "doesn't include CPU backend",
    "Triton is not installed",
    "requires Triton",
    "is not found in LD_PRELOAD",
    "Enforce eager set",
    "Inductor compilation was disabled",
    "Reset SSM cache type",
    "The global random seed is set to",  # VLLM_ENABLE_V1_MULTIPROCESSING=0 is our setting
)
"""vLLM warnings every CPU engine start (or step) prints, the same on every run: not news."""


VLLM_NOTE_LOGGERS = (
    "vllm",
    "vllm.engine.arg_utils",
    "vllm.config.vllm",
    "vllm.platforms.cpu",
    "vllm.v1.worker.cpu_worker",
    "vllm.triton_utils.importing",
)
"""Where vLLM logs :data:`VLLM_NOTES` (a logger's filters see only its own records)."""


def quiet_vllm(ours: str | None = None) -> bool:
    """Drop :data:`VLLM_NOTES` at the loggers that emit them and at vLLM's handlers (those
    exist once vLLM has configured its logging); returns whether the engines are quiet."""
    if engine_level(ours) == "DEBUG":
        return False
    flt = _DropFragments(VLLM_NOTES)
    for name in VLLM_NOTE_LOGGERS:
        _install_filter(logging.getLogger(name), flt)
    for handler in logging.getLogger("vllm").handlers:
        _install_filter(handler, flt)
    return True


_RAY_PREFIX = re.compile(r"^\(.*? pid=\d+(?:, ip=[^)]*)?\)\s?")
"""Ray's prefix of a worker's line on the driver: ``(MapWorker(MapBatches(X)) pid=12) ``."""
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TAG = re.compile(r"^\[([A-Za-z0-9_.\-/]+)\]")


def is_project_line(line: str) -> bool:
    """Whether a console line is the project's own (see the module doc)."""
    text = _RAY_PREFIX.sub("", _ANSI.sub("", line.rstrip("\n")).lstrip("\r"))
    m = _TAG.match(text)
    return bool(m) and m.group(1) in PROJECT_TAGS


def _printed_lines(text: str) -> list[str]:
    """Non-blank lines (a worker's blank line behind Ray's prefix is blank too)."""
    return [ln for ln in _ANSI.sub("", text).splitlines() if _RAY_PREFIX.sub("", ln).strip()]


def foreign_lines(text: str) -> list[str]:
    """The printed lines that are not the project's own."""
    return [ln for ln in _printed_lines(text) if not is_project_line(ln)]


def line_counts(text: str) -> dict[str, float]:
    """``total`` non-blank lines, ``ours`` (:func:`is_project_line`) and their ``share``."""
    lines = _printed_lines(text)
    ours = sum(1 for ln in lines if is_project_line(ln))
    return {"total": len(lines), "ours": ours, "share": ours / len(lines) if lines else 1.0}


def level() -> str:
    value = os.environ.get(ENV_LEVEL, "INFO").upper()
    return value if value in LEVELS else "INFO"


def engine_level(ours: str | None = None) -> str:
    """Engines and Ray: WARNING, everything when ours is DEBUG (and ERROR when ours is)."""
    ours = (ours or level()).upper()
    return {"DEBUG": "DEBUG", "ERROR": "ERROR"}.get(ours, "WARNING")


def worker_env(ours: str | None = None) -> dict[str, str]:
    """Environment variables that set the engines' own log levels (set before they import)."""
    ours = (ours or level()).upper()
    eng = engine_level(ours)
    env = {
        ENV_LEVEL: ours,
        "VLLM_LOGGING_LEVEL": eng,
        "RAY_DATA_LOG_LEVEL": eng,
        "TRANSFORMERS_VERBOSITY": eng.lower() if eng != "WARNING" else "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "DATASETS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if eng != "DEBUG":
        env["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # c10's "[W... utils.cpp] NUMA binding" notes
    return env


class _DropFragments(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record is not ours to judge
            return True
        return not any(f in msg for f in self.fragments)


class _BelowLevel(logging.Filter):
    """Drops records below a level, even when a library resets its logger's level."""

    def __init__(self, levelno: int) -> None:
        super().__init__()
        self.levelno = levelno

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.levelno


def _install_filter(logger: logging.Filterer, flt: logging.Filter) -> None:
    for old in [f for f in logger.filters if type(f) is type(flt)]:
        logger.removeFilter(old)
    logger.addFilter(flt)


def quiet_engines(ours: str | None = None) -> None:
    """Set the engines' loggers to their level and drop :data:`NOISE` at its source loggers."""
    eng = engine_level(ours)
    levelno = logging.getLevelName(eng)
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(levelno)
        if eng != "DEBUG":
            _install_filter(logger, _BelowLevel(levelno))
    _quiet_file_loggers(levelno)
    if eng == "DEBUG":
        return
    for name, fragments in NOISE.items():
        _install_filter(logging.getLogger(name), _DropFragments(fragments))
    quiet_vllm(ours)
    tlog = sys.modules.get("transformers.utils.logging")
    if tlog is not None:  # imported before us: its level came from the environment then
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


class _OurFormatter(logging.Formatter):
    """``[user_preferences] message`` for ``mllm_msr.stages.user_preferences``."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix("mllm_msr.").removeprefix("stages.")
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"[{name}] {msg}"


def configure(ours: str | None = None) -> str:
    """Set our level and the engines' in this process (and, through the environment, in the
    Ray workers started after it). Returns our level."""
    ours = (ours or level()).upper()
    if ours not in LEVELS:
        raise ValueError(f"--log-level {ours!r}: one of {', '.join(LEVELS)}")
    os.environ[ENV_LEVEL] = ours
    for k, v in worker_env(ours).items():
        if k == ENV_LEVEL or k not in os.environ or os.environ.get("_MLLM_MSR_SET_" + k):
            os.environ[k] = v
            os.environ["_MLLM_MSR_SET_" + k] = "1"
    logger = logging.getLogger("mllm_msr")
    logger.setLevel(ours)
    if not any(getattr(h, "_mllm_msr", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_OurFormatter())
        handler._mllm_msr = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    quiet_engines(ours)
    return ours


def configure_ray_data(ours: str | None = None) -> None:
    """Ray Data in this driver: no progress blocks, no execution plans (unless DEBUG)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    verbose = engine_level(ours) == "DEBUG"
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(engine_level(ours))


def _quiet_thread_excepthook() -> None:
    """Ray Train's PlacementGroupCleaner thread dies when the State API cannot find one Ray
    instance (no dashboard, several local instances): drop that traceback, keep the rest."""
    previous = threading.excepthook

    def hook(args):  # pragma: no cover - runs in a Ray actor
        name = getattr(args.thread, "name", "") or ""
        if name.startswith("PlacementGroupCleaner"):
            return
        previous(args)

    if getattr(previous, "_mllm_msr", False):
        return
    hook._mllm_msr = True  # type: ignore[attr-defined]
    threading.excepthook = hook


FILE_LOGGERS = ("ray.train.v2._internal.execution.context", "ray.train.collective.collectives")
"""Modules that log under their file path (``logging.getLogger(__file__)``), outside the
``ray.train`` hierarchy: "Reporting training result 1: TrainingReport(...)" on every report."""


def _quiet_file_loggers(levelno: int) -> None:
    import importlib.util

    for module in FILE_LOGGERS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(levelno)


def _pin_ray_address() -> None:
    """Point the State API of this worker at its own cluster.

    Ray Train's PlacementGroupCleaner asks the State API whether the Train controller is alive,
    with no address. Without ``RAY_ADDRESS`` that means the Ray instance started last on this
    host (``/tmp/ray/ray_current_cluster``): on a shared host another user's cluster, which
    does not know our controller, so the cleaner removed our training placement group and
    killed the workers mid-run. With our own address and no dashboard the query fails and the
    cleaner stops (its traceback is dropped, :func:`_quiet_thread_excepthook`)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    try:
        import ray

        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected: nothing to pin
        return
    if address:
        os.environ["RAY_ADDRESS"] = address


def setup_worker() -> None:
    """``worker_process_setup_hook`` of every Ray worker and actor: our levels there too, and
    the State API pinned to this cluster (:func:`_pin_ray_address`)."""
    _pin_ray_address()
    ours = level()
    configure(ours)
    if engine_level(ours) != "DEBUG":
        _quiet_thread_excepthook()
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", category=UserWarning, module=r"(torch|transformers|vllm|peft|deepspeed)\."
        )
