"""Settings per node kind: nothing CPU-specific reaches a GPU worker; the hub mode is a config
choice; the ``AWS_*`` variables reach the workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mllm_msr.config import ConfigError, EngineConfig, load_config, validate_models
from mllm_msr.runtime import cpu_only_env, worker_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for key in [*cpu_only_env(), "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]:
        monkeypatch.delenv(key, raising=False)
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_worker_env_has_no_cpu_only_settings(clean_env):
    env = worker_env(hf_hub_offline=True)
    assert not set(env) & set(cpu_only_env())
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in env
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert worker_env(hf_hub_offline=False)["HF_HUB_OFFLINE"] == "0"
    clean_env.setenv("HF_HUB_OFFLINE", "1")  # the driver's environment wins over the config
    assert worker_env(hf_hub_offline=False)["HF_HUB_OFFLINE"] == "1"


def test_worker_env_forwards_aws_variables(clean_env):
    assert not [k for k in worker_env() if k.startswith("AWS_")]
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_env.setenv("AWS_REGION", "eu-west-1")
    env = worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["AWS_REGION"] == "eu-west-1"


@pytest.mark.parametrize("gpu", [False, True])
def test_vllm_cpu_settings_only_in_a_process_without_gpu(clean_env, tmp_path, gpu):
    from mllm_msr.engines import vllm

    clean_env.setattr(vllm, "has_gpu", lambda: gpu)
    applied = vllm.configure_environment(EngineConfig(model="tiny:qwen2-vl"), tmp_path)
    cpu_keys = set(cpu_only_env())
    if gpu:
        assert not cpu_keys & set(applied) and not cpu_keys & set(os.environ)
    else:
        assert cpu_keys <= set(applied)
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_hf_hub_offline_is_a_config_choice():
    assert load_config(ROOT / "configs" / "demo-cpu.yaml").hf_hub_offline is True
    for name in ("qwen2.5-vl.yaml", "paper-llava.yaml"):  # GPU configs may use the hub
        assert load_config(ROOT / "configs" / name).hf_hub_offline is False
    spec = "someorg/never-cached-model-xyz"
    offline = load_config(
        None, [f"user_preferences.engine.model={spec}", "stages=[user_preferences]"]
    )
    with pytest.raises(ConfigError, match="never-cached"):
        validate_models(offline)
    online = load_config(
        None,
        [
            f"user_preferences.engine.model={spec}",
            "stages=[user_preferences]",
            "hf_hub_offline=false",
        ],
    )
    validate_models(online)  # the nodes download it


@pytest.mark.parametrize("gpu", [False, True])
def test_one_process_environment_per_node_kind(clean_env, tmp_path, gpu):
    from mllm_msr.engines import vllm
    from mllm_msr.runtime import process_env

    env = process_env(tmp_path, gpu)
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")
    assert bool(set(cpu_only_env()) & set(env)) is not gpu  # CPU-only settings: no GPU only
    assert not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} & set(env)  # a config choice
    for key in env:
        clean_env.delenv(key, raising=False)
    clean_env.setattr(vllm, "has_gpu", lambda: gpu)
    applied = vllm.configure_environment(EngineConfig(model="tiny:qwen2-vl"), tmp_path)
    assert "HF_HUB_OFFLINE" not in applied and "HF_HUB_OFFLINE" not in os.environ
    assert {k for k in env if k.startswith("VLLM_")} <= set(applied)


def test_one_process_env_for_engines_and_train_ranks(clean_env, tmp_path):
    """``apply_process_env`` is the one setter: the node's caches under the given dir, the
    user's own values kept, CPU-only settings only without a GPU, ``forced`` ones always."""
    from mllm_msr.runtime import apply_process_env, process_env

    for key in process_env(tmp_path, gpu=False):
        clean_env.delenv(key, raising=False)
    clean_env.setenv("VLLM_CACHE_ROOT", "/somewhere/else")
    applied = apply_process_env(tmp_path, gpu=True)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path.absolute() / "torch_extensions")
    assert os.environ["MLLM_MSR_CACHE"] == str(tmp_path.absolute())
    assert os.environ["VLLM_CACHE_ROOT"] == "/somewhere/else"  # the user's value wins
    assert "VLLM_CACHE_ROOT" not in applied
    assert not set(cpu_only_env()) & set(os.environ)  # a GPU process gets none of them
    applied = apply_process_env(
        tmp_path, gpu=False, prefix="VLLM_", forced={"VLLM_CPU_KVCACHE_SPACE": "3"}
    )
    assert set(applied) == set(cpu_only_env())  # only the missing VLLM_ ones, and forced
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_scoped_env_restores(clean_env):
    from mllm_msr.runtime import hub_env, scoped_env

    clean_env.setenv("TRANSFORMERS_OFFLINE", "0")
    with scoped_env(hub_env(True)):
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_engine_thread_runs_every_call_on_one_thread():
    import threading

    from mllm_msr.runtime import EngineThread

    thread = EngineThread("t")
    idents = {thread.run(threading.get_ident) for _ in range(3)}
    assert idents == {thread.ident} != {threading.get_ident()}
    # a call made on the engine thread runs directly (no deadlock), exceptions come back
    assert thread.run(lambda: thread.run(threading.get_ident)) == thread.ident
    with pytest.raises(ZeroDivisionError):
        thread.run(lambda: 1 / 0)
    thread.close()
    with pytest.raises(RuntimeError):
        thread.run(threading.get_ident)


def test_wall_span_covers_concurrent_batches():
    from mllm_msr.runtime import WallSpan

    span = WallSpan()
    assert span.seconds == 0.0  # no batch yet
    span.add(10.0, 14.0)
    span.add(11.0, 13.5)  # a concurrent actor's batch inside the first one's
    span.add(14.5, 16.0)
    assert span.seconds == pytest.approx(6.0)
