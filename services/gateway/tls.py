"""TLS for the gateway's client-facing ports: the server's certificate for gRPC and the web page, optional mutual
TLS on gRPC, and the client side (`ClientTLS`) for `GatewayClient`.

Certificates and keys are PEM files named by path (a pod mounts them from a Secret). Everything is read and
checked when the gateway is built, so a missing file, a key that does not match its certificate or a CA file
that holds no certificate is one clear error before anything serves.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_CERT, ENV_KEY, ENV_CLIENT_CA = "GENIE_TLS_CERT", "GENIE_TLS_KEY", "GENIE_TLS_CLIENT_CA"


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

    @classmethod
    def load(cls, cert_path: str, key_path: str, client_ca_path: str = "") -> ServerTLS:
        """Reads and checks the files; raises ValueError naming the file and what is wrong with it."""
        if not cert_path or not key_path:
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        tls = cls(_read(cert_path, "certificate"), _read(key_path, "key"),
                  _read(client_ca_path, "client CA") if client_ca_path else None)
        # ssl checks the pair the way grpc's BoringSSL will, but here, with a message, rather than at bind time.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ValueError(f"the TLS key {key_path} does not match the certificate {cert_path}, or one is not "
                             f"valid PEM: {exc.reason or exc}") from None
        if client_ca_path:
            try:
                context.load_verify_locations(cafile=client_ca_path)
            except ssl.SSLError as exc:
                raise ValueError(f"the TLS client CA {client_ca_path} holds no valid certificate: {exc.reason or exc}") from None
        return tls

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials; with a client CA, a client must present a certificate it signed."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.mutual)

    def ssl_context(self) -> ssl.SSLContext:
        """The web page's context: the same certificate, and no client certificate asked for (a browser has none;
        the page's API is authenticated by its bearer token)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # ssl loads chains only from files: write the PEM we checked to a private temporary directory.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(self.cert)
            key.touch(mode=0o600)
            key.write_bytes(self.key)
            context.load_cert_chain(cert, key)
        return context


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
