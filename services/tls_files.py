"""The client certificate files a TLS hop takes (Redis sessions, the Celery broker, Triton): checked alike."""

from __future__ import annotations


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
