"""RateLimitedLog: one line per cause per period, with the count it held back, and bounded memory."""

from __future__ import annotations

import logging

import pytest

from services.gateway.ratelog import RateLimitedLog


def test_one_line_per_cause_per_period_then_the_suppressed_count(caplog):
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("genie.test.ratelog"), period_s=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "genie.test.ratelog")
    written = [log.log("garbage Step", logging.WARNING, "bad %s", i) for i in range(1000)]
    assert written.count(True) == 1 and len(caplog.records) == 1 and caplog.records[0].getMessage() == "bad 0"
    assert log.log("garbage Play", logging.WARNING, "other cause")  # causes are limited apart
    now[0] = 10.0
    assert log.log("garbage Step", logging.WARNING, "bad %s", "again")
    assert caplog.records[-1].getMessage() == "bad again (999 more like this suppressed in the last 10 s)"


def test_memory_is_bounded_by_max_causes():
    log = RateLimitedLog(logging.getLogger("genie.test.ratelog"), period_s=10, max_causes=4)
    for i in range(100):
        log.log(f"cause {i}", logging.DEBUG, "x")
    assert len(log._last) == 4
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), period_s=0)
