"""SessionService (services/gateway/sessions.py) on its own: what a session's sampling is made of."""

from __future__ import annotations

from dataclasses import replace

from genie.sampling import SamplingConfig
from genie.spec import world_spec_of
from services.gateway.security.auth import Authenticator
from services.gateway.sessions import SessionService
from services.gateway.stores.memory_store import MemoryStore


class _SpecOnly:
    """A backend that only knows its world (no model call is made)."""

    def __init__(self, spec) -> None:
        self.spec = spec


def test_a_session_keeps_the_worlds_sampling_fields_the_client_does_not_choose(trained_world_dir):
    """A client picks steps and temperature; every other field (guidance, schedule, ...) stays the world's."""
    world = SamplingConfig(steps=3, guidance=1.5, schedule="linear")
    spec = replace(world_spec_of(trained_world_dir), sampling=world)
    service = SessionService(_SpecOnly(spec), MemoryStore(), Authenticator({"alice-token-0123456789": "alice"}))
    assert service._sampling(spec, 5, 0.5) == replace(world, steps=5, temperature=0.5)
    assert service._sampling(spec, 0, None) == world
