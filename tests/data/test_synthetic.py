import numpy as np
import pytest

from genie.data.synthetic import MOVES, MovingSprites, SpritesConfig


def test_clips_are_deterministic_per_seed_and_index():
    src = MovingSprites(SpritesConfig(height=32, width=32, frames=6, seed=3))
    a, b = src.clip(5), src.clip(5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(src.clip(6)[0], a[0])
    assert not np.array_equal(MovingSprites(SpritesConfig(height=32, width=32, frames=6, seed=4)).clip(5)[0], a[0])


def test_batch_shapes_and_dtypes():
    batch = MovingSprites(SpritesConfig(height=16, width=16, frames=5)).batch(step=2, batch_size=3)
    assert batch.frames.shape == (3, 5, 16, 16, 3) and str(batch.frames.dtype) == "torch.uint8"
    assert batch.actions.shape == (3, 4) and int(batch.actions.max()) < len(MOVES)


def test_true_actions_move_the_controlled_sprite():
    cfg = SpritesConfig(height=64, width=64, frames=16, distractors=0, action_repeat=1)
    src = MovingSprites(cfg)
    frames, actions = src.clip(0)
    color = frames[0].reshape(-1, 3).max(axis=0)  # the sprite is the brightest thing on a dark background

    def centre(f):
        ys, xs = np.nonzero((f == color).all(axis=-1))
        return np.array([ys.min(), xs.min()])

    for t, a in enumerate(actions):
        delta = centre(frames[t + 1]) - centre(frames[t])
        expected = np.array(MOVES[a]) * src.speed
        # at a wall the move is clipped, never reversed
        assert np.all((delta == expected) | (delta == 0)), (t, a, delta)


def test_bad_sprites_config():
    with pytest.raises(ValueError):
        SpritesConfig(frames=1)
