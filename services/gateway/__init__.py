"""The client-facing gateway: gRPC API, session stores (Redis, in-process), model backends (Triton, in-process)."""
