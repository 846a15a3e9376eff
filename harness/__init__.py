"""Harnesses that start real servers for tests and benchmarks (a Redis + Sentinel set on loopback, the chaos soak).
Not part of what services/ ships: tests/ and benchmarks/ import them from here."""
