"""Per-client API tokens. A token maps to a client id; sessions belong to the client id that opened them."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path


class Authenticator:
    """Token -> client id. Only hashes of tokens are held, and lookups compare hashes, not secrets."""

    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise ValueError("at least one API token is needed")
        for token, client in tokens.items():
            if len(token) < 16 or not client:
                raise ValueError(f"tokens must be >= 16 characters and name a client (client {client!r})")
        self._clients = {_hash(t): c for t, c in tokens.items()}

    def client_of(self, token: str | None) -> str | None:
        """The client id of a token, or None when the token is missing or unknown."""
        return self._clients.get(_hash(token)) if token else None

    @classmethod
    def from_spec(cls, spec: str) -> Authenticator:
        """`client:token,client:token`, or `@path` to a JSON file {"client": "token", ...}."""
        if spec.startswith("@"):
            data = json.loads(Path(spec[1:]).read_text())
            return cls({token: client for client, token in data.items()})
        pairs = [p.split(":", 1) for p in spec.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("token spec must be client:token[,client:token...] or @file.json")
        return cls({token.strip(): client.strip() for client, token in pairs})


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header value."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
