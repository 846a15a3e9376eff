"""The client-facing surface: the gRPC service (grpc_server.py), the play page and its JSON API (web.py, static/),
and the async Python client (client.py)."""
