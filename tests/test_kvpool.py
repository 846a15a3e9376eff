"""KVPool: slots by content, exclusive while a step holds them, LRU eviction under the byte cap, one live slot per
session and part, and batch views that are views (consecutive slots) or gathers written through on commit."""

import torch

from genie.kvpool import KVPool
from genie.nn.st_transformer import STTransformer, STTransformerConfig

CFG = STTransformerConfig(dim=8, depth=2, heads=2, max_frames=4)


def _pool(slots: int = 8, initial: int = 2) -> KVPool:
    probe = KVPool(CFG, tokens=3, max_bytes=1 << 30)
    return KVPool(CFG, tokens=3, max_bytes=slots * probe.slot_bytes, initial_slots=initial)


def test_a_hit_is_exclusive_until_released():
    pool = _pool()
    (slot,), hits = pool.acquire([("a", "x", "1")])
    assert hits == [False]
    pool.release([slot], [("a", "x", "1")])
    assert pool.acquire([("a", "x", "1")]) == ([slot], [True])
    assert pool.acquire([("a", "x", "1")])[1] == [False]  # taken: a racing duplicate misses into its own slot
    assert (pool.hits, pool.misses) == (1, 2)


def test_full_pool_evicts_the_least_recently_used_and_grows_only_for_one_batch():
    pool = _pool(slots=2, initial=1)
    for name in ("s0", "s1", "s2"):
        slots, _ = pool.acquire([(name, "x", "1")])
        pool.release(slots, [(name, "x", "1")])
    assert len(pool) == 2 and pool.capacity == 2
    assert pool.acquire([("s0", "x", "1")])[1] == [False]  # evicted, oldest first
    slots, _ = pool.acquire([(f"b{i}", "x", "1") for i in range(5)])  # one batch larger than the cap: served
    assert len(set(slots)) == 5 and pool.capacity >= 5


def test_one_live_slot_per_session_and_part():
    pool = _pool()
    for key in (("a", "dynamics", "v1"), ("a", "decoder", "v1")):
        slots, _ = pool.acquire([key])
        pool.release(slots, [key])
    slot, _ = pool.acquire([("a", "dynamics", "v1")])
    pool.release(slot, [("a", "dynamics", "v2")])  # the session moved on: its v1 dynamics slot is gone
    assert len(pool) == 2 and pool.acquire([("a", "dynamics", "v1")])[1] == [False]
    pool.drop_session("a")
    assert len(pool) == 0


def test_consecutive_slots_are_a_view_others_a_gather_written_through_on_commit():
    model = STTransformer(CFG).eval()
    pool = _pool()
    slots, _ = pool.acquire([("a", "x", "1"), ("b", "x", "1"), ("c", "x", "1")])
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        view = pool.batch(sorted(slots)[:2], [0, 0])
        assert view.sink is None and view.k.data_ptr() == pool.k[:, sorted(slots)[0]].data_ptr()
        model.forward_frame(x, view, commit=True)
        picked = [sorted(slots)[2], sorted(slots)[0]]  # not a consecutive run: a gather
        gathered = pool.batch(picked, [0, 1])
        assert gathered.sink is not None and pool.gathers == 1
        model.forward_frame(x, gathered, commit=True)
    # the gathered batch's commit reached the pool: row 1 (slot of "a") now holds two frames, the first untouched
    a = sorted(slots)[0]
    assert torch.equal(pool.k[:, a, :, :, 1], gathered.k[:, 1, :, :, 1])
    assert torch.equal(pool.k[:, a, :, :, 0], view.k[:, 0, :, :, 0])
    assert torch.equal(pool.k[:, picked[0], :, :, 0], gathered.k[:, 0, :, :, 0])


def test_a_budget_too_small_for_one_batch_is_refused_by_name():
    pool = _pool(slots=4)
    pool.require(4, "dynamics")  # fits: below it, the budget evicts idle caches
    try:
        pool.require(5, "dynamics")
    except ValueError as exc:
        assert "dynamics K/V cache budget holds 4 sessions" in str(exc) and "batch of 5" in str(exc)
    else:
        raise AssertionError("a batch of 5 in a 4-session budget must be refused")
