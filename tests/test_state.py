import pytest
import torch

from genie.nn.st_transformer import KVCache, STTransformerConfig
from genie.state import KVCacheStore, WorldState, digest


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


def _caches(frames=4):
    cfg = STTransformerConfig(dim=8, depth=1, heads=2, max_frames=frames)
    return KVCache.empty(cfg, 1, 4)


def test_store_take_is_exclusive_and_counts():
    store = KVCacheStore()
    c = _caches()
    store.put(("a", "x", "1"), c)
    assert store.take(("a", "x", "1")) is c
    assert store.take(("a", "x", "1")) is None
    assert (store.hits, store.misses) == (1, 1)
    assert store.nbytes == 0


def test_store_evicts_least_recent_by_bytes():
    size = _caches().nbytes()
    store = KVCacheStore(max_bytes=2 * size)
    for i in range(3):
        store.put((f"s{i}", "x", "1"), _caches())
    assert len(store) == 2 and store.nbytes == 2 * size
    assert store.take(("s0", "x", "1")) is None  # oldest evicted
    assert store.take(("s2", "x", "1")) is not None


def test_store_keeps_one_live_entry_per_session_and_part():
    store = KVCacheStore()
    store.put(("a", "dynamics", "v1"), _caches())
    store.put(("a", "decoder", "v1"), _caches())
    store.put(("a", "dynamics", "v2"), _caches())  # the session moved on: its v1 dynamics cache is dead
    assert len(store) == 2 and store.take(("a", "dynamics", "v1")) is None
    assert store.take(("a", "dynamics", "v2")) is not None and store.take(("a", "decoder", "v1")) is not None
    assert store.nbytes == 0


def test_store_drop_session_and_discard():
    store = KVCacheStore()
    store.put(("a", "x", "1"), _caches())
    store.put(("a", "y", "2"), _caches())
    store.put(("b", "x", "1"), _caches())
    store.drop_session("a")
    store.discard(("b", "x", "1"))
    assert len(store) == 0 and store.nbytes == 0


def test_digest_depends_on_content_shape_and_dtype():
    a = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    assert digest(a) == digest(a.clone())
    assert digest(a) != digest(a.reshape(3, 2))
    assert digest(a) != digest(a.to(torch.int64))
    b = a.clone()
    b[1, 2] = 0
    assert digest(a) != digest(b)
    assert digest(a, b) != digest(b, a)
