"""World.reset/step: shapes, determinism, cache hit == miss, batching, long sessions, state round trips."""

import pytest
import torch

from genie.data.synthetic import MovingSprites
from genie.models.dynamics import DynamicsModel
from genie.models.tokenizer import VideoTokenizer
from genie.nn.int8 import Int8Linear
from genie.sampling import SamplingConfig, World
from genie.state import WorldState
from genie.worlds import load_world


@pytest.fixture
def random_world(tiny_world_cfg):
    torch.manual_seed(1)
    return World(VideoTokenizer(tiny_world_cfg.tokenizer), DynamicsModel(tiny_world_cfg.dynamics),
                 SamplingConfig(steps=3, temperature=1.0))


def _prompt(cfg, b=2, t0=1, seed=0):
    clips = [MovingSprites(cfg.data.sprites()).clip(1000 + seed + i)[0][:t0] for i in range(b)]
    return torch.from_numpy(__import__("numpy").stack(clips))


def _play(world, states, actions_per_step):
    frames = []
    for acts in actions_per_step:
        states, f = world.step(states, acts)
        frames.append(f)
    return states, torch.stack(frames, dim=1)


def test_reset_and_step_shapes(random_world, tiny_world_cfg):
    states, first = random_world.reset(_prompt(tiny_world_cfg, b=2, t0=2), seeds=[1, 2])
    assert first.shape == (2, 16, 16, 3) and first.dtype == torch.uint8
    assert states[0].tokens.shape == (2, tiny_world_cfg.tokenizer.tokens_per_frame)
    new, frames = random_world.step(states, [0, 3])
    assert frames.shape == (2, 16, 16, 3) and frames.dtype == torch.uint8
    assert [s.version for s in new] == [1, 1] and [s.step for s in new] == [1, 1]
    assert new[1].actions.tolist() == [-1, -1, 3]
    assert states[0].tokens.shape[0] == 2  # inputs are not mutated


def test_same_seed_same_frames_other_seed_differs(random_world, tiny_world_cfg):
    prompt = _prompt(tiny_world_cfg, b=1)
    runs = []
    for seed in (5, 5, 6):
        states, _ = random_world.reset(prompt, seeds=[seed])
        runs.append(_play(random_world, states, [[1], [2], [0]])[1])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_cache_hit_and_miss_give_identical_frames(random_world, tiny_world_cfg):
    """Covers window slides too: the tiny window is 6 frames and we play 14 steps."""
    states, _ = random_world.reset(_prompt(tiny_world_cfg, b=1, t0=2), seeds=[3])
    actions = [[a % 4] for a in range(14)]
    with_cache = _play(random_world, states, actions)
    hits, misses = random_world.cache_counts
    assert hits > 0 and misses > 0  # slides rebuild the caches: misses by design
    no_cache = World(random_world.tokenizer, random_world.dynamics, random_world.sampling, cache_bytes=0)
    without = _play(no_cache, states, actions)
    assert torch.equal(with_cache[1], without[1])
    assert with_cache[0][0].equals(without[0][0])


def test_batch_of_sessions_equals_each_alone(random_world, tiny_world_cfg):
    prompt_a, prompt_b = _prompt(tiny_world_cfg, b=1, t0=1), _prompt(tiny_world_cfg, b=1, t0=3, seed=5)
    sa, _ = random_world.reset(prompt_a, seeds=[1])
    sb, _ = random_world.reset(prompt_b, seeds=[2])
    together = _play(random_world, sa + sb, [[1, 2], [3, 0], [2, 2]])[1]  # ragged histories: 1 and 3 frames
    alone_a = _play(random_world, sa, [[1], [3], [2]])[1]
    alone_b = _play(random_world, sb, [[2], [0], [2]])[1]
    assert torch.equal(together[0], alone_a[0]) and torch.equal(together[1], alone_b[0])


def test_serialised_state_continues_identically(random_world, tiny_world_cfg):
    states, _ = random_world.reset(_prompt(tiny_world_cfg, b=1), seeds=[9])
    states, _ = _play(random_world, states, [[1], [2]])
    restored = [WorldState.from_bytes(states[0].to_bytes())]
    fresh = World(random_world.tokenizer, random_world.dynamics, random_world.sampling)
    assert torch.equal(_play(random_world, states, [[3], [1]])[1], _play(fresh, restored, [[3], [1]])[1])


def test_bad_inputs_are_rejected(random_world, tiny_world_cfg):
    states, _ = random_world.reset(_prompt(tiny_world_cfg, b=1), seeds=[0])
    with pytest.raises(ValueError, match="out of range"):
        random_world.step(states, [4])
    with pytest.raises(ValueError, match="one action per state"):
        random_world.step(states, [0, 1])
    with pytest.raises(ValueError, match="expected video"):
        random_world.reset(torch.zeros(1, 1, 8, 8, 3, dtype=torch.uint8), seeds=[0])
    with pytest.raises(ValueError, match="frames"):
        random_world.reset(torch.zeros(1, 7, 16, 16, 3, dtype=torch.uint8), seeds=[0])
    # A rejected step changes nothing: the same state still steps.
    assert random_world.step(states, [0])[0][0].version == 1


def test_trained_world_long_session_stays_valid(trained_world_dir, tiny_world_cfg):
    """3x the training window: frames stay non-degenerate and look like the data (bright sprites on dark)."""
    world, cfg = load_world(trained_world_dir)
    states, _ = world.reset(_prompt(cfg, b=1), seeds=[0])
    steps = 3 * world.window
    states, frames = _play(world, states, [[i % world.num_actions] for i in range(steps)])
    assert frames.shape[1] == steps
    assert states[0].tokens.shape[0] <= world.window
    per_frame_std = frames.float().std(dim=(2, 3, 4))[0]  # (steps,)
    assert (per_frame_std > 5).all(), per_frame_std  # not blank
    assert frames.float().mean() < 150  # not washed out: the backgrounds are dark


def test_session_alone_equals_any_batch_and_slot(random_world, tiny_world_cfg):
    """A session's frames do not depend on its batch mates, their order, or which pool slots hold the caches
    (a gather of scattered slots vs a view of consecutive ones vs a fresh engine)."""
    prompts = _prompt(tiny_world_cfg, b=4, t0=2)
    states, _ = random_world.reset(prompts, seeds=[5, 6, 7, 8])
    steps = [[a % 4, (a + 1) % 4, (a + 2) % 4, (a + 3) % 4] for a in range(7)]  # past a slide of the 6-frame window
    together = _play(random_world, states, steps)[1]
    fresh = World(random_world.tokenizer, random_world.dynamics, random_world.sampling)
    fresh.reset(_prompt(tiny_world_cfg, b=3, t0=1, seed=40), seeds=[0, 0, 0])  # other sessions take the first slots
    reordered = [states[2], states[0]]  # a subset, out of slot order
    alone = _play(fresh, reordered, [[s[2], s[0]] for s in steps])[1]
    assert torch.equal(alone[0], together[2]) and torch.equal(alone[1], together[0])
    assert fresh.engine.pool.gathers > 0 or fresh.engine.pool.capacity >= 5


def test_fixed_shapes_give_the_same_frames(random_world, tiny_world_cfg):
    states, _ = random_world.reset(_prompt(tiny_world_cfg, b=2, t0=2), seeds=[3, 4])
    fixed = World(random_world.tokenizer, random_world.dynamics, random_world.sampling, fixed_shapes=True)
    actions = [[a % 4, (a + 2) % 4] for a in range(8)]
    assert torch.equal(_play(random_world, states, actions)[1], _play(fixed, states, actions)[1])


def test_no_cache_pool_keeps_nothing_between_steps(random_world, tiny_world_cfg):
    no_cache = World(random_world.tokenizer, random_world.dynamics, random_world.sampling, cache_bytes=0)
    states, _ = no_cache.reset(_prompt(tiny_world_cfg, b=2), seeds=[1, 2])
    _play(no_cache, states, [[0, 1], [2, 3]])
    assert no_cache.cache_counts[0] == 0 and len(no_cache.engine.pool) == 0 and len(no_cache.decoder.pool) == 0


def test_guidance_one_is_the_plain_step_and_other_values_change_the_frames(random_world, tiny_world_cfg):
    """guidance=1 is exactly the unguided step; g != 1 mixes in the no-action prediction (still deterministic and
    independent of batch mates)."""
    prompts = _prompt(tiny_world_cfg, b=2, t0=2)
    states, _ = random_world.reset(prompts, seeds=[3, 4])
    actions = [[a % 4, (a + 1) % 4] for a in range(5)]
    plain = _play(random_world, states, actions)[1]
    one = World(random_world.tokenizer, random_world.dynamics, SamplingConfig(steps=3, temperature=1.0, guidance=1.0))
    assert torch.equal(_play(one, states, actions)[1], plain)
    guided = World(random_world.tokenizer, random_world.dynamics, SamplingConfig(steps=3, temperature=1.0, guidance=3.0))
    frames = _play(guided, states, actions)[1]
    assert not torch.equal(frames, plain)
    assert torch.equal(_play(guided, states, actions)[1], frames)
    alone = _play(guided, [states[1]], [[a[1]] for a in actions])[1]
    assert torch.equal(alone[0], frames[1])


def test_guidance_out_of_range_is_refused():
    with pytest.raises(ValueError, match="guidance"):
        SamplingConfig(guidance=-1.0)


def test_int8_keeps_the_engines_contract_and_stays_near_fp32(trained_world_dir, tiny_world_cfg):
    """precision int8 (CPU): a session's frames do not depend on its batch mates, order or slots (int32 accumulation
    is exact and each row has its own scale), the caller's models stay fp32, and a trained world's frames stay close
    to its fp32 frames."""
    fp32, _ = load_world(trained_world_dir, precision="fp32")
    int8, _ = load_world(trained_world_dir, precision="int8")
    assert not any(isinstance(m, Int8Linear) for m in [*int8.dynamics.modules(), *int8.tokenizer.modules()])
    assert any(isinstance(m, Int8Linear) for m in int8.engine.model.modules())
    assert any(isinstance(m, Int8Linear) for m in int8.decoder.model.decoder.modules())
    assert not any(isinstance(m, Int8Linear) for m in int8.decoder.model.encoder.modules())  # encoding stays fp32
    prompts = _prompt(tiny_world_cfg, b=3, t0=2)
    states, _ = int8.reset(prompts, seeds=[5, 6, 7])
    steps = [[a % 4, (a + 1) % 4, (a + 2) % 4] for a in range(8)]  # past a slide of the 6-frame window
    together = _play(int8, states, steps)[1]
    fresh, _ = load_world(trained_world_dir, precision="int8")
    fresh.reset(_prompt(tiny_world_cfg, b=2, t0=1, seed=40), seeds=[0, 0])  # other sessions take the first slots
    alone = _play(fresh, [states[2], states[0]], [[s[2], s[0]] for s in steps])[1]
    assert torch.equal(alone[0], together[2]) and torch.equal(alone[1], together[0])
    # Near fp32: the first generated frame from the same prompt and seed (later frames may branch, as samples do).
    f32_states, _ = fp32.reset(prompts, seeds=[5, 6, 7])
    first_fp32 = _play(fp32, f32_states, steps[:1])[1][:, 0].float()
    first_int8 = together[:, 0].float()
    mse = (first_fp32 - first_int8).pow(2).mean(dim=(1, 2, 3))
    assert (10 * torch.log10(255**2 / mse.clamp_min(1e-6)) > 25).all(), mse
