"""Shared fixtures. Keep additions small and independent: several areas use this file."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray for the whole session: 2 CPUs, its own temp dir, shut down after.

    Never ``ray stop``: other Ray clusters may run on the same host.
    """
    import ray

    from mllm_msr.runtime import cpu_env_defaults

    if ray.is_initialized():
        yield ray
        return
    env = {k: os.environ.get(k, v) for k, v in cpu_env_defaults().items()}
    for key in ("MLLM_MSR_CACHE", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    for key, value in env.items():
        os.environ.setdefault(key, value)
    temp = tempfile.mkdtemp(prefix="mmsr-ray-")  # short: Ray's socket paths have a length cap
    ray.init(
        address="local",  # never join another cluster running on this host
        num_cpus=2,
        object_store_memory=500_000_000,
        include_dashboard=False,
        _temp_dir=temp,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
