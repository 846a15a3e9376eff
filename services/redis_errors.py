"""Short reasons for Redis errors, shared by the gateway's session store and the job client."""

from __future__ import annotations

import re

from redis.exceptions import ConnectionError as RedisConnectionError


def short_reason(exc: BaseException) -> str:
    """str(exc), except for redis-py's "No master found": that one spells out every Sentinel client in full, so it
    is cut down to the kind of error each Sentinel gave (e.g. auth:AuthenticationError, network:ConnectionError)."""
    text = str(exc)
    if isinstance(exc, RedisConnectionError) and text.startswith("No master found"):
        head = text.split(" : ", 1)[0]
        kinds = re.findall(r" - ([\w.:]+)", text)
        return f"{head} (Sentinel errors: {', '.join(kinds)})" if kinds else head
    return text
