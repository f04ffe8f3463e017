"""Redis for tests: the machine's server (127.0.0.1:6379, .ci/run starts it), each test under a key prefix
of its own that is deleted after it, so tests and helpers sharing the server never see each other's keys."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from postmux.testing import delete_prefix

REDIS_URL = os.environ.get("POSTMUX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        client.close()
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({e}): .ci/run starts it (see its redis part)")
    return client


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted after the test."""
    prefix = f"postmux-test:{os.urandom(6).hex()}:"
    yield prefix
    client = redis_client()
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, a child process stopped by its PID: an
    outage is simulated on it, never on the machine's shared server. `stop` then `start` is a restart
    (without persistence, as the machine's: what it held is gone)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + 10.0
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """kill -9: Redis gone at once, as a crashed server or a lost host (nothing written on the way)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10.0)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10.0)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    from tests.support import free_port

    server = PrivateRedis(free_port()).start()
    yield server
    server.stop()
