import math

import pytest
import torch

from genie.nn.maskgit import counter_uniform, decode_plan, mask_ratio, maskgit_decode, noise_key, random_frame_mask

K, MASK = 10, 10


def _noise(seeds, step=0):
    keys = torch.tensor([noise_key(s, step) for s in seeds])
    return lambda iteration, stream, count: counter_uniform(keys, iteration, stream, count)


def _logits_fn(table):
    """A fixed 'model': logits depend on position only, (N, K) -> broadcast over the batch."""
    return lambda tokens: table.expand(tokens.shape[0], -1, -1)


def test_schedules():
    assert mask_ratio(1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert mask_ratio(0.5, "cosine") == pytest.approx(math.cos(math.pi / 4))
    assert mask_ratio(0.25, "linear") == pytest.approx(0.75)
    assert mask_ratio(0.5, "square") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown schedule"):
        mask_ratio(0.5, "exp")


def test_random_frame_mask_rates_and_first_frame():
    gen = torch.Generator().manual_seed(0)
    mask = random_frame_mask((64, 5, 100), 0.5, 1.0, gen)
    assert not mask[:, 0].any()
    rates = mask[:, 1:].float().mean(dim=-1)
    assert rates.min() > 0.35 and rates.mean() == pytest.approx(0.75, abs=0.03)


def test_decode_fills_everything_and_keeps_known_tokens():
    table = torch.randn(12, K)
    tokens = torch.full((2, 12), MASK)
    tokens[:, :3] = 7
    out = maskgit_decode(_logits_fn(table), tokens, MASK, _noise([0, 1]), steps=4, temperature=1.0)
    assert (out != MASK).all()
    assert (out[:, :3] == 7).all()
    assert (tokens[:, 3:] == MASK).all()  # input not mutated


def test_greedy_is_argmax():
    table = torch.randn(12, K)
    out = maskgit_decode(_logits_fn(table), torch.full((1, 12), MASK), MASK, _noise([0]), steps=3, temperature=0)
    assert torch.equal(out[0], table.argmax(-1))


def test_each_step_commits_at_least_one_token():
    calls = []

    def fn(tokens):
        calls.append((tokens == MASK).sum().item())
        return torch.zeros(tokens.shape[0], tokens.shape[1], K)

    maskgit_decode(fn, torch.full((1, 5), MASK), MASK, _noise([0]), steps=5, temperature=1.0)
    assert calls == sorted(calls, reverse=True) and len(set(calls)) == len(calls) == 5


def test_deterministic_and_batch_independent():
    table = torch.randn(16, K)
    toks = torch.full((3, 16), MASK)

    def run(seeds, rows):
        return maskgit_decode(_logits_fn(table), toks[:rows], MASK, _noise(seeds), steps=6, temperature=2.0,
                              choice_temperature=1.0)

    a = run([1, 2, 3], 3)
    assert torch.equal(a, run([1, 2, 3], 3))
    assert torch.equal(a[1:2], run([2], 1))  # a row's samples depend on its own (seed, step) only
    assert not torch.equal(a[0], a[2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        maskgit_decode(_logits_fn(torch.randn(4, K)), torch.full((1, 4), MASK), MASK, _noise([0]), steps=0)
    ragged = torch.full((2, 4), MASK)
    ragged[0, 0] = 1
    with pytest.raises(ValueError, match="as many masked tokens"):
        maskgit_decode(_logits_fn(torch.randn(4, K)), ragged, MASK, _noise([0, 1]), steps=2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_follow_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    fn = lambda tokens: logits.expand(tokens.shape[0], tokens.shape[1], K)  # noqa: E731
    out = maskgit_decode(fn, torch.full((100, 500), MASK), MASK, _noise(range(100)), steps=1, temperature=temperature)
    freq = torch.bincount(out.flatten(), minlength=K).float() / out.numel()
    assert torch.allclose(freq, torch.softmax(logits / temperature, dim=0), atol=0.008)  # ~5 sigma at 50k draws


def test_counter_noise_is_uniform_and_keyed():
    keys = torch.tensor([noise_key(s, t) for s in range(10) for t in range(10)])  # (100, 2)
    u = counter_uniform(keys, 3, 0, 20_000)  # (100, 20000)
    assert u.min() > 0 and u.max() < 1
    z = (u.mean(dim=1) - 0.5) / (12 ** -0.5 / 20_000**0.5)  # each row's mean, in standard errors
    assert z.abs().max() < 4.5 and 0.7 < z.std() < 1.3
    hist = torch.histc(u.flatten(), 100, 0, 1) / u.numel()
    assert (hist - 0.01).abs().max() < 0.0005  # 2M draws: ~7 sigma
    other_iteration, other_stream = counter_uniform(keys[:1], 4, 0, 20_000)[0], counter_uniform(keys[:1], 3, 1, 20_000)[0]
    corr = torch.corrcoef(torch.stack([u[0], u[1], other_iteration, other_stream]))
    assert (corr - torch.eye(4)).abs().max() < 0.04  # other (seed, step), iteration or stream: uncorrelated
    assert torch.equal(counter_uniform(keys[5:6], 3, 0, 100), u[5:6, :100])  # a row alone = in any batch
    assert noise_key(1, 2) != noise_key(2, 1) and noise_key(-1, 0) != noise_key(0, 0)


def test_decode_plan_matches_schedule():
    assert decode_plan(64, 8, "cosine") == [62, 59, 53, 45, 35, 24, 12, 0]
    assert decode_plan(5, 25, "cosine") == [4, 3, 2, 1, 0]  # at least one token per step, then stop
    assert decode_plan(4, 1, "linear") == [0] and decode_plan(0, 3, "cosine") == []
