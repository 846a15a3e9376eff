"""Certificate files of the TLS hops (gateway, Redis sessions, the Celery broker, Triton): checked alike, and
hashed to notice a renewal."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path


def check_client_files(hop: str, ca: tuple[str, str], cert: tuple[str, str], key: tuple[str, str]) -> None:
    """Raises ValueError unless a client certificate comes with its key (and the other way round) and every file
    named can be read. Each argument is (setting, path): the flag or env var the user set, for the message."""
    (cert_name, cert_path), (key_name, key_path) = cert, key
    if bool(cert_path) != bool(key_path):
        raise ValueError(f"a {hop} client certificate needs both {cert_name} and {key_name}")
    for name, path in (ca, cert, key):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"{name}: cannot read the {hop} file {path!r}: {exc.strerror or exc}") from None


def check_server_pair(cert_path: str, key_path: str, client_ca_path: str = "") -> None:
    """Raises ValueError unless the PEM key matches the PEM certificate (chain) and the client CA file, if named,
    holds a certificate: the checks a TLS server's files get at startup and again before a renewal is served."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"the TLS key {key_path} does not match the certificate {cert_path}, or one is not "
                         f"valid PEM: {getattr(exc, 'reason', None) or exc}") from None
    if client_ca_path:
        try:
            context.load_verify_locations(cafile=client_ca_path)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"the TLS client CA {client_ca_path} holds no valid certificate: "
                             f"{getattr(exc, 'reason', None) or exc}") from None


def files_digest(*paths: str) -> bytes | None:
    """A hash of the named files' contents ("" counts as an empty file), to notice that a certificate was renewed;
    None while one cannot be read (a file being replaced)."""
    try:
        return contents_digest(*(Path(path).read_bytes() if path else b"" for path in paths))
    except OSError:
        return None


def contents_digest(*contents: bytes) -> bytes:
    """files_digest of files holding these bytes: for contents already read, so that the hash is of what was used."""
    h = hashlib.sha256()
    for data in contents:
        h.update(data)
        h.update(b"\0")
    return h.digest()
