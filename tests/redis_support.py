"""Redis for tests: the machine's server (127.0.0.1:6379, .ci/run starts it), each test under a key prefix
of its own that is deleted after it, so tests and helpers sharing the server never see each other's keys."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

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
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
