"""Hypothesis strategies for well-formed Gateway requests with arbitrary field values (shared by the fuzz tests
and `benchmarks/fuzz.py`): extremes of every integer width, NaN and infinities, odd strings, images of any
size and mode, corrupt images, and raw frames whose dimensions multiply past 2^64."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from genie_api.v1 import gateway_pb2 as pb

U32_EDGES = [0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
# An open proto3 enum: any int32 travels, known or not. Valid values are drawn more often than not, so that
# most requests get past their first check and exercise the next one.
frame_format = st.one_of(st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))
temperature = st.one_of(st.none(), st.none(), st.floats(width=32), st.floats(0, 10, width=32))


def _image(w: int, h: int, mode: str, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def images(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "valid", "valid", "corrupt", "truncated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    modes = ["RGB", "L", "RGBA", "P", "I;16", "1", "LA"] if fmt == "PNG" else ["RGB", "L", "CMYK"]
    data = _image(draw(st.integers(1, 80)), draw(st.integers(1, 80)), draw(st.sampled_from(modes)), fmt,
                  draw(st.integers(0, 1000)))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "corrupt":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        return bytes(buf)
    return data


@st.composite
def raw_frames(draw, height: int, width: int, window: int) -> pb.RawFrames:
    """Mostly the world's shape (so the request gets through to the models), else arbitrary dimensions."""
    if draw(st.integers(0, 3)):
        count = draw(st.integers(0, window + 2))
        h, w, c = height, width, draw(st.sampled_from([3, 3, 3, 3, 1, 4]))
        size = count * h * w * c
        size += draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1]))
        data = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
        return pb.RawFrames(count=count, height=h, width=w, channels=c, data=data)
    dims = [draw(u32) for _ in range(4)]
    return pb.RawFrames(count=dims[0], height=dims[1], width=dims[2], channels=dims[3], data=draw(st.binary(max_size=64)))


def session_ids(known: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known), st.sampled_from(known + [""]), st.text(max_size=80),
                     st.text("0123456789abcdef", min_size=32, max_size=32))


def options() -> st.SearchStrategy[pb.SamplingOptions]:
    steps = st.one_of(st.sampled_from([0, 0, 1, 2, 64, 65]), u32)
    return st.builds(lambda s, t, seed: pb.SamplingOptions(steps=s, temperature=t, seed=seed), steps, temperature,
                     st.one_of(st.none(), st.integers(0, 1000), u64))


@st.composite
def requests(draw, height: int, width: int, window: int, known: list[str], num_actions: int = 8) -> tuple[str, object]:
    """(method, request): a well-formed message for one of the Gateway's RPCs (Play: a list of StepRequests)."""
    method = draw(st.sampled_from(["OpenSession", "Step", "Play", "GetSession", "CloseSession", "ListActions",
                                   "InferActions"]))
    step = st.builds(lambda sid, a, f: pb.StepRequest(session_id=sid, action=a, frame_format=f), session_ids(known),
                     st.one_of(st.integers(0, num_actions - 1), st.integers(0, num_actions), u32), frame_format)
    if method == "OpenSession":
        opts, fmt = draw(options()), draw(frame_format)
        if draw(st.booleans()):
            return method, pb.OpenSessionRequest(image=draw(images()), options=opts, frame_format=fmt)
        return method, pb.OpenSessionRequest(frames=draw(raw_frames(height, width, window)), options=opts, frame_format=fmt)
    if method == "Step":
        return method, draw(step)
    if method == "Play":
        return method, draw(st.lists(step, min_size=1, max_size=3))
    if method == "GetSession":
        return method, pb.GetSessionRequest(session_id=draw(session_ids(known)))
    if method == "CloseSession":
        return method, pb.CloseSessionRequest(session_id=draw(session_ids(known)))
    if method == "ListActions":
        return method, pb.ListActionsRequest()
    return method, pb.InferActionsRequest(frames=draw(raw_frames(height, width, window)))
