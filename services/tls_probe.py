"""Why a TLS hop fails on certificates: one handshake with Python's ssl, whose errors name the cause, where gRPC
reports only "unavailable" ("Socket closed" when the server refuses a client without a certificate)."""

from __future__ import annotations

import socket
import ssl

# OpenSSL alert reasons a server sends when it refuses the client's certificate (or the lack of one).
_REFUSALS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")


def certificate_problem(host: str, port: int, ca: str = "", cert: str = "", key: str = "",
                        timeout_s: float = 3.0) -> str | None:
    """One line on why a TLS connection to host:port with these PEM files fails on certificates: the server's does
    not verify with `ca` (empty: the system CAs), or the server refuses ours. None when the connection works, or
    fails for any other reason (refused, timed out, a plaintext server): only certificate problems are certain
    enough to stop retrying. Host names are not checked here (gRPC checks them itself, against the name it dialled).
    """
    context = ssl.create_default_context(cafile=ca or None)
    context.check_hostname = False
    if cert:
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            # With TLS 1.3 the client's handshake ends before the server has checked the client's certificate:
            # a refusal arrives as an alert on the first read; a gRPC server that accepts sends its HTTP/2 settings.
            tls.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return f"its certificate does not verify with {f'the CA {ca}' if ca else 'the system CAs'}: {exc.verify_message}"
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if any(word in reason.upper() for word in _REFUSALS):
            whose = f"the client certificate {cert}" if cert else "a client without a certificate"
            return f"it refused {whose} ({reason})"
    except OSError:
        pass
    return None
