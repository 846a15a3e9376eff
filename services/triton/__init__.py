"""The Triton model services: the wire protocol, the repository assembler and the tritonserver launcher.

The launcher's names are re-exported lazily: the model.py glue inside Triton imports `services.triton.protocol`,
and the CLI imports `services.triton.cli`, neither of which should pull in tritonclient and torch at import time.
"""

from __future__ import annotations

__all__ = ["Batching", "GPU_BATCHING", "Placement", "Repository", "TritonServer", "TritonTLS", "assemble_repository", "free_ports",
           "pytriton_dir", "resolve_placement", "visible_gpus"]


def __getattr__(name: str):
    if name in __all__:
        from services.triton import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
