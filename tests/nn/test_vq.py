import pytest
import torch

from genie.nn.vq import VectorQuantizer, VectorQuantizerConfig


@pytest.mark.parametrize("normalize", [True, False])
def test_codes_round_trip(normalize):
    vq = VectorQuantizer(VectorQuantizerConfig(num_codes=16, code_dim=8, normalize=normalize)).eval()
    idx = torch.randint(0, 16, (4, 5))
    out = vq(vq.lookup(idx))
    assert torch.equal(out.indices, idx)
    assert torch.allclose(out.quantized, vq.lookup(idx), atol=1e-6)
    assert out.loss.item() < 1e-10


def test_straight_through_gradient_reaches_input():
    vq = VectorQuantizer(VectorQuantizerConfig(num_codes=16, code_dim=8, normalize=False))
    z = torch.randn(10, 8, requires_grad=True)
    out = vq(z)
    (out.quantized * torch.arange(8.0)).sum().backward()
    # The straight-through estimator passes the downstream gradient to z unchanged.
    assert torch.allclose(z.grad, torch.arange(8.0).expand(10, 8))


def test_commitment_and_codebook_losses_have_gradients():
    vq = VectorQuantizer(VectorQuantizerConfig(num_codes=16, code_dim=8, normalize=False, beta=0.25))
    z = torch.randn(10, 8, requires_grad=True)
    vq(z).loss.backward()
    assert z.grad.abs().sum() > 0 and vq.codebook.grad.abs().sum() > 0


def _train_usage(reset_after: int) -> float:
    """A short training on varied data whose encoder collapses onto a corner of the space."""
    torch.manual_seed(0)
    vq = VectorQuantizer(VectorQuantizerConfig(num_codes=32, code_dim=4, normalize=False, reset_after=reset_after))
    # Codebook starts far from the data: without resets most codes are never chosen.
    vq.codebook.data = torch.randn(32, 4) * 0.1 + 5.0
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
    for _ in range(300):
        z = torch.randn(256, 4)
        out = vq(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vq.eval()
    with torch.no_grad():
        idx = vq(torch.randn(4096, 4)).indices
    return idx.unique().numel() / 32


def test_dead_code_reset_keeps_codebook_in_use():
    with_reset = _train_usage(reset_after=10)
    without = _train_usage(reset_after=0)
    assert with_reset > 0.5, with_reset
    assert without < with_reset  # the resets are what keeps usage up


def test_bad_input_shape():
    vq = VectorQuantizer(VectorQuantizerConfig(num_codes=16, code_dim=8))
    with pytest.raises(ValueError, match="last dim 8"):
        vq(torch.randn(3, 7))


@pytest.mark.parametrize("kwargs", [{"num_codes": 1}, {"code_dim": 0}, {"beta": -1.0}, {"reset_after": -1}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        VectorQuantizerConfig(**kwargs)


@pytest.mark.parametrize("normalize", [True, False])
def test_bf16_autocast_picks_the_same_codes_as_fp32(normalize):
    """The nearest-code search runs in fp32 inside a bf16 autocast region (bf16 distances flip near-ties)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(VectorQuantizerConfig(num_codes=1024, code_dim=32, normalize=normalize)).eval()
    z = torch.randn(4096, 32)
    fp32 = vq(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = vq(z).indices
    assert torch.equal(fp32, bf16)
