import math

import pytest
import torch

from genie.nn.maskgit import mask_ratio, maskgit_decode, random_frame_mask

K, MASK = 10, 10


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
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = maskgit_decode(_logits_fn(table), tokens, MASK, gens, steps=4, temperature=1.0)
    assert (out != MASK).all()
    assert (out[:, :3] == 7).all()
    assert (tokens[:, 3:] == MASK).all()  # input not mutated


def test_greedy_is_argmax():
    table = torch.randn(12, K)
    out = maskgit_decode(_logits_fn(table), torch.full((1, 12), MASK), MASK, [torch.Generator()], steps=3, temperature=0)
    assert torch.equal(out[0], table.argmax(-1))


def test_each_step_commits_at_least_one_token():
    calls = []

    def fn(tokens):
        calls.append((tokens == MASK).sum().item())
        return torch.zeros(tokens.shape[0], tokens.shape[1], K)

    maskgit_decode(fn, torch.full((1, 5), MASK), MASK, [torch.Generator()], steps=5, temperature=1.0)
    assert calls == sorted(calls, reverse=True) and len(set(calls)) == len(calls) == 5


def test_deterministic_and_batch_independent():
    table = torch.randn(16, K)
    toks = torch.full((3, 16), MASK)

    def run(seeds, rows):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return maskgit_decode(_logits_fn(table), toks[:rows], MASK, gens, steps=6, temperature=2.0, choice_temperature=1.0)

    a = run([1, 2, 3], 3)
    assert torch.equal(a, run([1, 2, 3], 3))
    assert torch.equal(a[1:2], run([2], 1))  # a row's samples depend on its own generator only
    assert not torch.equal(a[0], a[2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        maskgit_decode(_logits_fn(torch.randn(4, K)), torch.full((1, 4), MASK), MASK, [torch.Generator()], steps=0)
    with pytest.raises(ValueError, match="one generator per row"):
        maskgit_decode(_logits_fn(torch.randn(4, K)), torch.full((2, 4), MASK), MASK, [torch.Generator()], steps=2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_follow_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    fn = lambda tokens: logits.expand(tokens.shape[0], tokens.shape[1], K)  # noqa: E731
    gens = [torch.Generator().manual_seed(i) for i in range(100)]
    out = maskgit_decode(fn, torch.full((100, 500), MASK), MASK, gens, steps=1, temperature=temperature)
    freq = torch.bincount(out.flatten(), minlength=K).float() / out.numel()
    assert torch.allclose(freq, torch.softmax(logits / temperature, dim=0), atol=0.008)  # ~5 sigma at 50k draws
