import pytest
import torch

from genie.state import WorldState, digest


def _state(**kw):
    base = dict(session_id="s1", tokens=torch.randint(0, 64, (3, 16), dtype=torch.int32),
                actions=torch.tensor([-1, 2, 0], dtype=torch.int32), seed=7, version=4, step=2)
    base.update(kw)
    return WorldState(**base)


def test_state_bytes_round_trip_is_exact():
    s = _state()
    back = WorldState.from_bytes(s.to_bytes())
    assert back.equals(s)
    assert back.tokens.dtype == torch.int32 and back.actions.dtype == torch.int32


@pytest.mark.parametrize("data", [b"", b"garbage-bytes-that-are-not-safetensors", b"\x00" * 64])
def test_state_from_garbage_raises_value_error(data):
    with pytest.raises(ValueError, match="WorldState"):
        WorldState.from_bytes(data)


def test_state_shape_checked():
    with pytest.raises(ValueError, match="bad state shapes"):
        _state(actions=torch.zeros(2, dtype=torch.int32))


def test_digest_depends_on_content_shape_and_dtype():
    a = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    assert digest(a) == digest(a.clone())
    assert digest(a) != digest(a.reshape(3, 2))
    assert digest(a) != digest(a.to(torch.int64))
    b = a.clone()
    b[1, 2] = 0
    assert digest(a) != digest(b)
    assert digest(a, b) != digest(b, a)
