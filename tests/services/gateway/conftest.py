"""Fixtures for gateway tests: the real Redis on 127.0.0.1 (CI starts it), API tokens."""

from __future__ import annotations

import os

import pytest

REDIS_URL = os.environ.get("GENIE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url(require_redis) -> str:
    return require_redis(REDIS_URL)
