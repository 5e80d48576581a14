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


# --------------------------------------------------------------------------- object storage


MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's ``ThreadedMotoServer``) with one bucket.

    Sets the standard AWS variables (endpoint, region, test credentials) in this process for
    the session, so that pyarrow's ``S3FileSystem`` and Ray workers started afterwards
    (``init_ray`` forwards ``AWS_*``) reach it; restores them afterwards. Yields
    ``{"endpoint", "bucket"}``; a run directory is ``s3://<bucket>/<name>``.
    """
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # In a child process: moto's server imports Flask, whose context proxies make vLLM's
    # kernel registration (it walks every loaded module) fail in this test process.
    server = subprocess.Popen(
        [sys.executable, "-c", MOTO_SERVER, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout.readline().strip() == "ready", "moto server did not start"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    bucket = "mmsr-test"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket}
    finally:
        server.stdin.close()  # the child exits at end of input
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
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
