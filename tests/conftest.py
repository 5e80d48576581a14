"""Shared fixtures. Keep additions small and independent: several areas use this file."""

from __future__ import annotations

import contextlib
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

    if ray.is_initialized():
        yield ray
        return
    _start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()
        while _RAY_TEMPS:
            shutil.rmtree(_RAY_TEMPS.pop(), ignore_errors=True)


_RAY_TEMPS: list[str] = []


def _start_local_ray() -> None:
    import ray

    from mllm_msr.runtime import aws_env, cpu_env_defaults

    env = {k: os.environ.get(k, v) for k, v in cpu_env_defaults().items()}
    for key in ("MLLM_MSR_CACHE", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    for key, value in env.items():
        os.environ.setdefault(key, value)
    env.update(aws_env())
    temp = tempfile.mkdtemp(prefix="mmsr-ray-")  # short: Ray's socket paths have a length cap
    _RAY_TEMPS.append(temp)
    ray.init(
        address="local",  # never join another cluster running on this host
        num_cpus=2,
        object_store_memory=500_000_000,
        include_dashboard=False,
        _temp_dir=temp,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )


@contextlib.contextmanager
def ray_cluster(head_cpus: int, workers: list[dict], head_object_store: int = 150 * 2**20):
    """A ``ray.cluster_utils.Cluster`` on this host: a head with ``head_cpus`` and one worker
    node per ``add_node`` keyword dict in ``workers`` (150 MiB object store unless given).
    Yields ``(cluster, worker nodes)``; the session's embedded Ray is stopped for the duration
    and started again afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "object_store_memory": head_object_store},
    )
    nodes = [c.add_node(**{"object_store_memory": 150 * 2**20, **w}) for w in workers]
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        if had_ray:
            _start_local_ray()


# --------------------------------------------------------------------------- object storage


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's ``ThreadedMotoServer``) with one bucket.

    Sets the standard AWS variables (endpoint, region, test credentials) in this process for
    the session, so that pyarrow's ``S3FileSystem`` and Ray workers started afterwards
    (``init_ray`` forwards ``AWS_*``) reach it; restores them afterwards. Yields
    ``{"endpoint", "bucket"}``; a run directory is ``s3://<bucket>/<name>``.
    """
    import boto3
    from s3_local import aws_env, start_server, stop_server

    server, endpoint = start_server()
    env = aws_env(endpoint)
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    bucket = "mmsr-test"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket}
    finally:
        stop_server(server)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def ray_s3(s3_server, ray_local):
    """``ray_local`` whose workers see the S3 server's ``AWS_*`` settings.

    Ray workers inherit the environment of the moment Ray started: a session whose Ray started
    before :func:`s3_server` gets a fresh Ray with the same settings (and the S3 variables).
    """
    import ray

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3_server["endpoint"]:
        ray.shutdown()
        _start_local_ray()
    yield ray
