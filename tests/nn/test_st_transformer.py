import pytest
import torch

from genie.nn.st_transformer import KVCache, STTransformer, STTransformerConfig

CFG = STTransformerConfig(dim=32, depth=2, heads=4, ffn_mult=2, max_frames=6)


def test_shapes():
    model = STTransformer(CFG)
    x = torch.randn(2, 5, 7, 32)
    assert model(x).shape == (2, 5, 7, 32)


def test_causal_in_time():
    model = STTransformer(CFG).eval()
    x = torch.randn(2, 6, 7, 32)
    y = model(x)
    x2 = x.clone()
    x2[:, 3:] = torch.randn_like(x2[:, 3:])  # change frames 3.. only
    y2 = model(x2)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=1e-6)
    assert not torch.allclose(y[:, 3:], y2[:, 3:], atol=1e-3)


def test_spatial_attention_mixes_within_frame():
    model = STTransformer(CFG).eval()
    x = torch.randn(1, 2, 7, 32)
    x2 = x.clone()
    x2[0, 0, 0] += torch.randn(32)  # one token of frame 0 (not a constant shift, which LayerNorm removes)
    diff = (model(x) - model(x2)).abs().amax(dim=-1)  # (1, 2, 7)
    assert (diff[0, 0] > 1e-4).all()  # every token of the same frame sees it
    assert (diff[0, 1] > 1e-4).all()  # later frames see it through time


def test_frame_by_frame_matches_full_forward():
    model = STTransformer(CFG).eval()
    x = torch.randn(3, 6, 7, 32)
    full = model(x)
    cache = KVCache.empty(CFG, batch=3, tokens=7)
    outs = []
    with torch.no_grad():
        for t in range(6):
            probe = model.forward_frame(x[:, t], cache, commit=False)
            outs.append(model.forward_frame(x[:, t], cache, commit=True))
            assert torch.equal(probe, outs[-1])  # the scratch slot does not leak between calls
    assert torch.allclose(torch.stack(outs, dim=1), full, atol=1e-5)
    assert cache.lengths.tolist() == [6, 6, 6]
    with pytest.raises(ValueError, match="cache is full"):
        model.forward_frame(x[:, 0], cache, commit=False)


def test_ragged_batch_matches_rows_alone():
    """Rows with different history lengths in one batch give what each gives alone."""
    model = STTransformer(CFG).eval()
    hist = [torch.randn(1, n, 7, 32) for n in (1, 4)]
    new = torch.randn(2, 7, 32)
    caches = []
    with torch.no_grad():
        for h in hist:
            c = KVCache.empty(CFG, 1, 7)
            for t in range(h.shape[1]):
                model.forward_frame(h[:, t], c, commit=True)
            caches.append(c)
        alone = [model.forward_frame(new[i : i + 1], caches[i], commit=False) for i in range(2)]
        batch = KVCache(torch.cat([c.k for c in caches], dim=1), torch.cat([c.v for c in caches], dim=1),
                        torch.cat([c.lengths for c in caches]), [n for c in caches for n in c.host_lengths])
        together = model.forward_frame(new, batch, commit=True)
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    assert batch.lengths.tolist() == batch.host_lengths == [2, 5]


def test_fixed_shapes_and_kv_only_commit_match():
    """The fixed-shape layout (no host lengths: all T slots, masked) computes what the sized one does, and a
    commit that skips the output stores the same keys/values as one that computes it."""
    model = STTransformer(CFG).eval()
    hist = torch.randn(2, 3, 7, 32)
    new = torch.randn(2, 7, 32)
    sized, fixed, kv_only = (KVCache.empty(CFG, 2, 7) for _ in range(3))
    with torch.no_grad():
        for t in range(3):
            model.forward_frame(hist[:, t], sized, commit=True)
            model.forward_frame(hist[:, t], kv_only, commit=True, output=False)
        fixed.k, fixed.v = sized.k.clone(), sized.v.clone()
        fixed.lengths, fixed.host_lengths = torch.tensor([3, 1]), None  # ragged: row 1 keeps only its first frame
        sized.lengths, sized.host_lengths = torch.tensor([3, 1]), [3, 1]
        assert model.forward_frame(new, kv_only, commit=True, output=False) is None
        out_sized = model.forward_frame(new, sized, commit=True)
        out_fixed = model.forward_frame(new, fixed, commit=True)
    assert torch.allclose(out_sized, out_fixed, atol=1e-5)
    assert torch.allclose(kv_only.k[:, 0, :, :, :4], sized.k[:, 0, :, :, :4], atol=1e-6)  # row 0: same history, same new frame
    assert fixed.lengths.tolist() == [4, 2] and fixed.host_lengths is None
    with pytest.raises(ValueError, match="neither commits"):
        model.forward_frame(new, sized, commit=False, output=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dim": 30, "heads": 4}, "divisible"), ({"depth": 0}, "positive"), ({"max_frames": 0}, "max_frames")],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STTransformerConfig(**kwargs)


def test_too_many_frames():
    with pytest.raises(ValueError, match="max_frames=6"):
        STTransformer(CFG)(torch.randn(1, 7, 4, 32))


def test_attend_runs_in_fp32_on_a_cpu_under_bf16_autocast():
    import torch.nn.functional as F

    from genie.nn.st_transformer import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 5, 8, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    assert torch.equal(out, want)  # the fp32 kernel, rounded once at the end
    x = torch.randn(3, 2, 4, 8, generator=g)
    assert torch.equal(attend(x, x, x), F.scaled_dot_product_attention(x, x, x))  # fp32 passes straight through
