"""Why a TLS hop fails on certificates: one handshake with Python's ssl, whose errors name the cause, where gRPC
reports only "unavailable" ("Socket closed" when the server refuses a client without a certificate)."""

from __future__ import annotations

import socket
import ssl

# OpenSSL alert reasons a server sends when it refuses the client's certificate (or the lack of one).
_REFUSALS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def certificate_problem(host: str, port: int, ca: str = "", cert: str = "", key: str = "",
                        timeout_s: float = 3.0) -> str | None:
    """One line on why a TLS connection to host:port with these PEM files fails on certificates: the server's does
    not verify with `ca` (empty: the system CAs), or the server refuses ours (an alert, or a hang-up right after
    the handshake). None when the server answers, or the connection fails for any other reason (refused, timed
    out, a plaintext server): only certificate problems are certain enough to stop retrying. Host names are not
    checked here (gRPC checks them itself, against the name it dialled).
    """
    context = ssl.create_default_context(cafile=ca or None)
    context.check_hostname = False
    if cert:
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    whose = f"the client certificate {cert}" if cert else "a client without a certificate"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            # With TLS 1.3 the client's handshake ends before the server has checked the client's certificate: the
            # verdict comes after. A gRPC server that accepts answers the HTTP/2 preface with its settings.
            tls.sendall(_HTTP2_PREFACE)
            if tls.recv(1):
                return None
    except ssl.SSLCertVerificationError as exc:
        return f"its certificate does not verify with {f'the CA {ca}' if ca else 'the system CAs'}: {exc.verify_message}"
    except ssl.SSLEOFError:
        pass  # closed without an alert: as below
    except ssl.SSLError as exc:  # an alert, e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED from OpenSSL servers
        reason = exc.reason or ""
        return f"it refused {whose} ({reason})" if any(w in reason.upper() for w in _REFUSALS) else None
    except OSError:
        return None
    # The handshake completed and the server hung up without a byte: what Triton's gRPC (BoringSSL) does to a client
    # whose certificate it refuses or that has none, where OpenSSL servers send an alert.
    return f"it refused {whose} (it closed the connection right after the handshake)"
