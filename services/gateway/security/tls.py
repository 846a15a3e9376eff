"""TLS for the gateway's client-facing ports: the server's certificate for gRPC and the web page, optional mutual
TLS on gRPC, and the client side (`ClientTLS`) for `GatewayClient`.

Certificates and keys are PEM files named by path (a pod mounts them from a Secret). Everything is read and
checked when the gateway is built, so a missing file, a key that does not match its certificate or a CA file
that holds no certificate is one clear error before anything serves.

Rotation without a restart (`CertificateReloader`): the gateway re-reads the files every few seconds (and on
SIGHUP). When their contents change and the new set passes the same checks, new gRPC and HTTPS connections get
the new certificate (and client CA); connections already open keep theirs, so no stream is cut. A new set that
fails the checks (a half-written file, a key of another certificate) is logged once and ignored: the old
certificate keeps serving. This is what cert-manager needs: it renews into the Secret, the kubelet swaps the
mounted files atomically, and nothing restarts.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.tls_files import check_server_pair, contents_digest, files_digest

ENV_CERT, ENV_KEY, ENV_CLIENT_CA = "GENIE_TLS_CERT", "GENIE_TLS_KEY", "GENIE_TLS_CLIENT_CA"

log = logging.getLogger(__name__)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"the TLS {what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """The gateway's certificate chain and key (PEM bytes) and, for mutual TLS on gRPC, the CA that signs clients."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    paths: tuple[str, str, str] = field(default=("", "", ""), compare=False)  # (cert, key, client CA) read from

    @classmethod
    def load(cls, cert_path: str, key_path: str, client_ca_path: str = "") -> ServerTLS:
        """Reads and checks the files; raises ValueError naming the file and what is wrong with it."""
        if not cert_path or not key_path:
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        tls = cls(_read(cert_path, "certificate"), _read(key_path, "key"),
                  _read(client_ca_path, "client CA") if client_ca_path else None, (cert_path, key_path, client_ca_path))
        check_server_pair(cert_path, key_path, client_ca_path)  # here, with a message, rather than at bind time
        return tls

    def digest(self) -> bytes:
        """files_digest of the files as they were read: what this object serves."""
        return contents_digest(self.cert, self.key, self.client_ca or b"")

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials; with a client CA, a client must present a certificate it signed."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.mutual)

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        """The same certificate (and client CA) as a configuration a dynamic credential can switch to."""
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.client_ca)

    def ssl_context(self) -> ssl.SSLContext:
        """The web page's context: the same certificate, and no client certificate asked for (a browser has none;
        the page's API is authenticated by its bearer token)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load_into(context)
        return context

    def load_into(self, context: ssl.SSLContext) -> None:
        """Puts this certificate chain into `context`; connections accepted after this get it."""
        # ssl loads chains only from files: write the PEM we checked to a private temporary directory.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(self.cert)
            key.touch(mode=0o600)
            key.write_bytes(self.key)
            context.load_cert_chain(cert, key)


class CertificateReloader:
    """Serves a `ServerTLS` and switches to new files without a restart (see the module docstring).

    `grpc_credentials()` and `ssl_context()` are what the gRPC server and the page listen with; `check()` re-reads
    the files and returns True (switched), False (changed but refused: the old certificate serves on) or None
    (unchanged). `on_result("ok" | "error")` is told of each switch and refusal, for metrics.
    """

    def __init__(self, tls: ServerTLS, on_result: Callable[[str], None] | None = None) -> None:
        if not tls.paths[0]:
            raise ValueError("a CertificateReloader needs a ServerTLS loaded from files (ServerTLS.load)")
        self.current, self._on_result = tls, on_result
        self._digest = self._refused = tls.digest()
        self._lock = threading.Lock()  # grpc calls _fetch on its own threads
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._contexts: list[ssl.SSLContext] = []

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials that ask `_fetch` before each new connection's handshake whether the certificate changed.
        Whether clients must present a certificate is fixed for the server's life (mutual TLS on or off)."""
        return grpc.dynamic_ssl_server_credentials(self.current.grpc_configuration(), self._fetch,
                                                   require_client_authentication=self.current.mutual)

    def ssl_context(self) -> ssl.SSLContext:
        """A context for the page that `check()` keeps up to date (the chain is reloaded into it in place)."""
        context = self.current.ssl_context()
        self._contexts.append(context)
        return context

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending  # None: keep the configuration the server has

    def check(self) -> bool | None:
        """Re-reads the files; switches to them if they changed and pass the checks ServerTLS.load makes."""
        paths = self.current.paths
        digest = files_digest(*paths)
        if digest is None:  # a file missing for a moment (being replaced): the next check will see
            return self._refuse(b"unreadable", f"cannot read one of {', '.join(p for p in paths if p)}")
        if digest == self._digest:
            self._refused = digest  # back to what serves: a later bad change is news again
            return None
        try:
            new = ServerTLS.load(*paths)
        except ValueError as exc:
            return self._refuse(digest, str(exc))
        for context in self._contexts:
            new.load_into(context)
        with self._lock:
            self._pending = new.grpc_configuration()
        self.current, self._digest, self._refused = new, new.digest(), new.digest()  # what was read, if it moved on
        log.info("TLS certificate reloaded from %s", paths[0])
        if self._on_result is not None:
            self._on_result("ok")
        return True

    def _refuse(self, digest: bytes, why: str) -> bool:
        if digest != self._refused:  # once per new content, not every period while it stays bad
            self._refused = digest
            log.warning("new TLS files not used, the current certificate serves on: %s", why)
            if self._on_result is not None:
                self._on_result("error")
        return False


def server_tls_from(cert_path: str = "", key_path: str = "", client_ca_path: str = "") -> ServerTLS | None:
    """ServerTLS from paths, falling back to GENIE_TLS_CERT / GENIE_TLS_KEY / GENIE_TLS_CLIENT_CA; None when no
    certificate or key is named anywhere (plaintext)."""
    cert = cert_path or os.environ.get(ENV_CERT, "")
    key = key_path or os.environ.get(ENV_KEY, "")
    client_ca = client_ca_path or os.environ.get(ENV_CLIENT_CA, "")
    if not cert and not key:
        if client_ca:
            raise ValueError("a TLS client CA needs the server's certificate and key (--tls-cert and --tls-key)")
        return None
    return ServerTLS.load(cert, key, client_ca)


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the gateway and, for mutual TLS, proves who it is.

    `ca`: PEM file of the CA that signed the gateway's certificate ("" = the system's roots). `cert`/`key`: this
    client's certificate and key for mutual TLS. `server_name`: the name to verify the certificate against, when
    it differs from the host dialled (e.g. dialling an IP of a pod whose certificate names the Service).
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a TLS client certificate needs its key, and a key its certificate")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
