"""Fixtures for gateway tests: the real Redis on 127.0.0.1 (CI starts it), API tokens."""

from __future__ import annotations

import os

import pytest
import redis

REDIS_URL = os.environ.get("GENIE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"these tests need a real Redis at {REDIS_URL} (scripts/test.sh starts one): {exc}")
    return REDIS_URL
