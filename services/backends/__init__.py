"""Model access: the ModelBackend interface and its implementations (in-process, Triton), with routing, micro-batching
and admission; the gateway, the rollout workers and the Triton launcher import it, none of them owns it."""
