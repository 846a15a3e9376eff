"""Shapes, causality and config errors of the three models (their learning is tested in tests/train)."""

from dataclasses import replace

import pytest
import torch

from genie.models.common import FrameSpec, patchify, unpatchify
from genie.models.dynamics import DynamicsModel, DynamicsModelConfig
from genie.models.lam import LatentActionModel, LatentActionModelConfig, transition_errors
from genie.models.tokenizer import VideoTokenizer, VideoTokenizerConfig


def _video(b=2, t=5, hw=16, seed=0):
    return torch.randint(0, 256, (b, t, hw, hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_patchify_round_trip():
    spec = FrameSpec(16, 12, 3)
    v = torch.randn(2, 3, 16, 12, 3)
    p = patchify(v, 4)
    assert p.shape == (2, 3, 12, 48)
    assert torch.equal(unpatchify(p, 4, spec), v)


def test_tokenizer_shapes_and_causality(tiny_world_cfg):
    tok = VideoTokenizer(tiny_world_cfg.tokenizer).eval()
    v = _video()
    out = tok(v)
    assert out.recon.shape == (2, 5, 16, 16, 3) and out.indices.shape == (2, 5, 16)
    assert out.indices.max() < tiny_world_cfg.tokenizer.vq.num_codes
    v2 = v.clone()
    v2[:, 3:] = _video(seed=1)[:, 3:]
    a, b = tok.encode(v), tok.encode(v2)
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.equal(a[:, 3:], b[:, 3:])
    d1, d2 = tok.decode(a), tok.decode(b)
    assert torch.allclose(d1[:, :3], d2[:, :3], atol=1e-5)


def test_tokenizer_decode_frame_matches_decode(tiny_world_cfg):
    tok = VideoTokenizer(tiny_world_cfg.tokenizer).eval()
    tokens = torch.randint(0, 64, (2, 4, 16))
    full = tok.decode(tokens)
    cache = tok.new_cache(2)
    frames = torch.stack([tok.decode_frame(tokens[:, t], cache) for t in range(4)], dim=1)
    assert torch.allclose(frames, full, atol=1e-5)


def test_lam_shapes_and_causality(tiny_world_cfg):
    lam = LatentActionModel(tiny_world_cfg.lam).eval()
    v = _video(t=6)
    out = lam(v)
    assert out.actions.shape == (2, 5) and out.prediction.shape == (2, 5, 16, 16, 3)
    assert out.actions.max() < tiny_world_cfg.lam.num_actions
    v2 = v.clone()
    v2[:, 4:] = _video(t=6, seed=3)[:, 4:]
    # action t (frame t -> t+1) sees frames <= t+1: actions 0..2 cannot change when frames 4.. change
    assert torch.equal(lam.infer_actions(v)[:, :3], lam.infer_actions(v2)[:, :3])
    with pytest.raises(ValueError, match="2..6 frames"):
        lam.infer_actions(v[:, :1])


def test_lam_decoder_does_not_see_the_future(tiny_world_cfg):
    lam = LatentActionModel(tiny_world_cfg.lam).eval()
    v = _video(t=6)
    v2 = v.clone()
    v2[:, 5] = 0  # only the last frame changes
    with torch.no_grad():
        p1, p2 = lam(v).prediction, lam(v2).prediction
    # predictions of frames 1..4 come from frames <= 3 and actions that never saw frame 5
    assert torch.allclose(p1[:, :4], p2[:, :4], atol=1e-5)


def test_pair_lam_sees_only_its_two_frames(tiny_world_cfg):
    lam = LatentActionModel(replace(tiny_world_cfg.lam, context=1)).eval()
    v = _video(t=6)
    out = lam(v)
    assert out.actions.shape == (2, 5) and out.prediction.shape == (2, 5, 16, 16, 3)
    # Action t depends on frames t and t+1 alone: a clip's labels are those of its pairs labelled one by one.
    pairs = torch.cat([lam.infer_actions(v[:, t : t + 2]) for t in range(5)], dim=1)
    assert torch.equal(lam.infer_actions(v), pairs)
    v2 = v.clone()
    v2[:, 0] = _video(t=1, seed=5)[:, 0]  # frame 0 changes: only action 0 may change, and prediction 1 only
    assert torch.equal(lam.infer_actions(v)[:, 1:], lam.infer_actions(v2)[:, 1:])
    with torch.no_grad():
        assert torch.allclose(lam(v).prediction[:, 1:], lam(v2).prediction[:, 1:], atol=1e-5)


def test_pair_lam_reversal_and_balance_train_only(tiny_world_cfg):
    cfg = replace(tiny_world_cfg.lam, context=1, time_reversal=0.5, balance=0.1)
    lam = LatentActionModel(cfg)
    v = _video(t=6)
    torch.manual_seed(0)
    a = lam.train()(v).loss
    torch.manual_seed(1)
    b = lam(v).loss
    assert not torch.isclose(a, b)  # a different draw of reversed pairs gives another loss
    lam.eval()
    with torch.no_grad():  # no reversal at inference: the same labels whatever the global generator's state
        torch.manual_seed(0)
        x = lam(v)
        torch.manual_seed(1)
        y = lam(v)
    assert torch.equal(x.actions, y.actions) and torch.equal(x.loss, y.loss)
    # balance: a transition's error is weighed against how much that transition changed
    plain = LatentActionModel(replace(cfg, time_reversal=0.0, balance=0.0))
    plain.load_state_dict(lam.state_dict())
    with torch.no_grad():
        assert not torch.isclose(plain.eval()(v).loss, x.loss)


def test_change_focus_puts_a_small_change_on_par_with_a_large_one():
    before = torch.zeros(1, 2, 16, 48)  # (B, T-1, N, P): two transitions of 768 values each
    target = before.clone()
    target[0, 0, 3, :4] = 1.0  # transition 0: 4 values change (a sprite's step)
    target[0, 1] = 0.5  # transition 1: every value changes (a scroll)
    copy = before  # a prediction that says "nothing moved"
    plain = transition_errors(copy, target, before)
    assert torch.allclose(plain, torch.tensor([[4 / 768, 0.25]]))  # the small change is all but invisible
    focused = transition_errors(copy, target, before, change_focus=4.0)
    # the 4 changed values carry 4/5 of the weight: error (4 + 4 * 768) / (768 * 5), about 0.8
    assert torch.allclose(focused[0, 0], torch.tensor((4 + 4 * 768) / (768 * 5)))
    assert torch.allclose(focused[0, 1], plain[0, 1])  # a uniform change is weighted uniformly
    exact_sprite = copy.clone()
    exact_sprite[0, 0, 3, :4] = 1.0  # right where it changed, off by 0.1 on the still backdrop
    exact_sprite[0, 0] += 0.1 * (target[0, 0] == 0)
    assert transition_errors(exact_sprite, target, before, 4.0)[0, 0] < 0.02 < focused[0, 0]


def test_dynamics_shapes_causality_and_actions(tiny_world_cfg):
    dyn = DynamicsModel(tiny_world_cfg.dynamics).eval()
    c = tiny_world_cfg.dynamics
    tokens = torch.randint(0, c.num_tokens, (2, 5, c.tokens_per_frame))
    acts = torch.randint(0, c.num_actions + 1, (2, 5))
    logits = dyn.logits(tokens, acts)
    assert logits.shape == (2, 5, c.tokens_per_frame, c.num_tokens)
    tokens2, acts2 = tokens.clone(), acts.clone()
    tokens2[:, 3:] = c.mask_id
    acts2[:, 3] = (acts[:, 3] + 1) % c.num_actions
    logits2 = dyn.logits(tokens2, acts2)
    assert torch.allclose(logits[:, :3], logits2[:, :3], atol=1e-5)
    assert not torch.allclose(logits[:, 3], logits2[:, 3], atol=1e-3)  # the action conditions its frame
    out = dyn.train()(tokens, acts[:, 1:].clamp_max(c.num_actions - 1))
    assert out.loss.ndim == 0 and out.loss.item() > 0
    with pytest.raises(ValueError, match="expected actions"):
        dyn(tokens, acts)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda c: replace(c.tokenizer, patch=3), "does not divide"),
        (lambda c: replace(c.lam, patch=0), "does not divide"),
        (lambda c: replace(c.dynamics, mask_min=0.0), "mask_min"),
        (lambda c: replace(c.dynamics, action_dropout=1.0), "action_dropout"),
        (lambda c: replace(c.tokenizer, decoder=replace(c.tokenizer.decoder, max_frames=3)), "max_frames differ"),
        (lambda c: replace(c.dynamics, transformer=replace(c.dynamics.transformer, causal_time=False)), "causal"),
        (lambda c: FrameSpec(0, 16, 3), "positive"),
        (lambda c: replace(c.lam, context=2), "context must be 0"),
        (lambda c: replace(c.lam, time_reversal=0.5), "needs context=1"),
        (lambda c: replace(c.lam, context=1, time_reversal=1.0), "time_reversal"),
        (lambda c: replace(c.lam, balance=-1.0), "balance"),
        (lambda c: replace(c.lam, change_focus=-1.0), "change_focus"),
    ],
)
def test_bad_model_configs(tiny_world_cfg, make, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_world_cfg)


def test_wrong_video_shape_is_clear(tiny_world_cfg):
    tok = VideoTokenizer(tiny_world_cfg.tokenizer)
    with pytest.raises(ValueError, match=r"expected video \(B, T, 16, 16, 3\)"):
        tok.encode(torch.zeros(1, 2, 16, 16, 1, dtype=torch.uint8))
    dyn = DynamicsModel(DynamicsModelConfig(num_tokens=64, tokens_per_frame=16, num_actions=4,
                                            transformer=tiny_world_cfg.dynamics.transformer))
    with pytest.raises(ValueError, match="expected tokens"):
        dyn.logits(torch.zeros(1, 2, 15, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    assert isinstance(LatentActionModelConfig(), LatentActionModelConfig) and isinstance(VideoTokenizerConfig(), object)
