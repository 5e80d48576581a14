"""A real S3 API on 127.0.0.1 for tests and benchmarks: moto's ``ThreadedMotoServer`` in a child
process (moto's server imports Flask, whose context proxies make vLLM's kernel registration fail
in the process that loads it), reached through the standard ``AWS_*`` variables."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

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


def start_server(timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start the server; returns the process (it exits when its stdin closes) and the endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", MOTO_SERVER, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("moto server did not start")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point pyarrow, boto3 and Ray workers at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }


def stop_server(server: subprocess.Popen) -> None:
    server.stdin.close()  # the child exits at end of input
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
