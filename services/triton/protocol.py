"""The wire contract between the Triton model services and their client: model and tensor names, parameters.

Shared by `services/*/1/model.py` (inside the Triton stub) and `services/backends/triton_backend.py`, so the two
sides never spell a name differently; `tests/services/triton/test_triton_server.py` checks the pbtxt files
declare exactly these. Every request carries one item (batch dimension 1); Triton's dynamic batcher groups
requests of equal shapes into one execute() call, which is why windows are padded to a fixed size.
"""

from __future__ import annotations

# Model names in the repository (one directory each under services/).
TOKENIZER, LAM, DYNAMICS = "tokenizer", "lam", "dynamics"
MODELS = (TOKENIZER, LAM, DYNAMICS)


def version_model_name(kind: str, world: str, version: int) -> str:
    """The Triton model that serves `kind` of one catalogue version (a Triton started with explicit model control
    holds any number of them): "coinrun.v3.dynamics". Catalogue names are [a-z0-9._-] and versions integers, so
    distinct versions never share a name."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {list(MODELS)}")
    return f"{world}.v{int(version)}.{kind}"

# Inputs. Shapes exclude the batch axis; W is the dynamics window, N tokens per frame, H W C a frame.
FRAMES = "FRAMES"  # (W, H, W, C) uint8: frames, zero-padded to the window (LAM: to its own window)
NUM_FRAMES = "NUM_FRAMES"  # (1,) int32: how many leading rows of FRAMES / WINDOW_TOKENS are real
WINDOW_TOKENS = "WINDOW_TOKENS"  # (W, N) int32: a session's token window, zero-padded
WINDOW_ACTIONS = "WINDOW_ACTIONS"  # (W,) int32: the actions that led into each window frame, -1 = none / padding
SESSION_ID = "SESSION_ID"  # (1,) bytes: utf-8 session id, keys the soft K/V caches
SEED = "SEED"  # (1,) int64
STEP = "STEP"  # (1,) int64: frames generated so far; with SEED fixes the sampling noise
VERSION = "VERSION"  # (1,) int64
ACTION = "ACTION"  # (1,) int32 in [0, A): the action to take
SAMPLING_STEPS = "SAMPLING_STEPS"  # (1,) int32: MaskGIT iterations
TEMPERATURE = "TEMPERATURE"  # (1,) fp64: fp64 so the value is the caller's float exactly
SCHEDULE = "SCHEDULE"  # (1,) bytes: mask schedule name
CHOICE_TEMPERATURE = "CHOICE_TEMPERATURE"  # (1,) fp64
GUIDANCE = "GUIDANCE"  # (1,) fp64, optional (absent = 1: no classifier-free guidance)

# Outputs.
TOKENS = "TOKENS"  # tokenizer encode: (NUM_FRAMES, N) int32 (outputs need no padding: each response has its own)
FRAME = "FRAME"  # tokenizer decode: (H, W, C) uint8, the last frame of the window
NEXT_TOKENS = "NEXT_TOKENS"  # dynamics: (N,) int32
LATENT_ACTIONS = "LATENT_ACTIONS"  # lam: (NUM_FRAMES - 1,) int32 in [0, A)

# The tokenizer model does two things; which one is picked by the inputs a request carries.
ENCODE_INPUTS = (FRAMES, NUM_FRAMES)
DECODE_INPUTS = (WINDOW_TOKENS, NUM_FRAMES, SESSION_ID)
DYNAMICS_INPUTS = (WINDOW_TOKENS, NUM_FRAMES, WINDOW_ACTIONS, SESSION_ID, SEED, STEP, VERSION, ACTION,
                   SAMPLING_STEPS, TEMPERATURE, SCHEDULE, CHOICE_TEMPERATURE)
DYNAMICS_OPTIONAL_INPUTS = (GUIDANCE,)  # clients from before these inputs existed leave them out
LAM_INPUTS = (FRAMES, NUM_FRAMES)

# Model config parameters the launcher fills in (string values, as Triton stores them).
PARAM_WORLD_DIR = "world_dir"  # the world directory the model loads (else env GENIE_WORLD_DIR)
PARAM_THREADS = "threads"  # torch intra-op threads per model instance; 0 = torch's default
PARAM_CACHE_BYTES = "cache_bytes"  # bytes cap of an instance's soft K/V cache (tokenizer, dynamics)
PARAM_WORLD_SPEC = "world_spec"  # dynamics: services.backends.backend.WorldSpec as JSON, read by clients
PARAM_MAX_FRAMES = "max_frames"  # lam: the clip length it accepts at most
PARAM_PRECISION = "precision"  # auto | fp32 | bf16: the engines' compute precision (auto: bf16 on a GPU, fp32 on a CPU)
PARAM_WORLD_DIGEST = "world_digest"  # a catalogue version's digest: a loaded model with another is not this version
WORLD_DIR_ENV = "GENIE_WORLD_DIR"
