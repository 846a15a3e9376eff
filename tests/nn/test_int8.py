"""Int8 linear layers: close to fp32, and a row's output depends on that row alone."""

import pytest
import torch
from torch import nn

from genie.nn.int8 import Int8Linear, quantize_linears, quantize_rows


def test_rows_are_scaled_by_their_own_maximum():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).tolist() == [127, 127, 0]
    assert torch.allclose(q.float() * scale, x, atol=float(scale.max()) / 2)


@pytest.mark.parametrize("bias", [True, False])
def test_close_to_the_fp32_layer(bias):
    torch.manual_seed(0)
    linear = nn.Linear(192, 768, bias=bias)
    x = torch.randn(3, 64, 192)
    ref, out = linear(x), Int8Linear(linear)(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, rel  # per-row/per-channel int8 of Gaussian data: about 1% relative error


def test_a_rows_output_does_not_depend_on_its_batch_mates():
    torch.manual_seed(1)
    layer = Int8Linear(nn.Linear(64, 96))
    x = torch.randn(40, 64)
    together = layer(x)
    other = torch.cat([x[:7] * 1000, x[7:8], torch.randn(5, 64)])  # a huge neighbour cannot change row 7's scale
    assert torch.equal(layer(other)[7], together[7])
    assert torch.equal(layer(x[7:8])[0], together[7]) and torch.equal(layer(x[5:9])[2], together[7])


def test_quantize_linears_replaces_only_the_parts_given():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 4))
    assert quantize_linears(model, [model[2], model[3]]) == 2
    assert isinstance(model[0], nn.Linear) and isinstance(model[2][0], Int8Linear) and isinstance(model[3], Int8Linear)
    assert isinstance(model[2][1], nn.LayerNorm)
    assert quantize_linears(model) == 1 and isinstance(model[0], Int8Linear)
