"""services/tls_probe.py against a real TLS listener that requires client certificates: a certificate problem is
named (the server's does not verify, or ours is missing or unknown to it); anything else is no diagnosis."""

from __future__ import annotations

import socket

import pytest

from services.tls_probe import certificate_problem
from tests.tls_certs import make_certs, tls_listener


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("probe-certs"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("stranger-certs"), name="stranger")


def test_the_right_files_have_no_problem(certs):
    with tls_listener(certs) as port:
        assert certificate_problem("127.0.0.1", port, str(certs.ca), str(certs.client_cert), str(certs.client_key)) is None


def test_certificate_problems_are_named(certs, stranger):
    with tls_listener(certs) as port:
        unverified = certificate_problem("127.0.0.1", port, str(stranger.ca), str(certs.client_cert), str(certs.client_key))
        assert unverified.startswith(f"its certificate does not verify with the CA {stranger.ca}"), unverified
        missing = certificate_problem("127.0.0.1", port, str(certs.ca))
        # The alert (TLSV13_ALERT_CERTIFICATE_REQUIRED), or a reset that swallowed it: either way a refusal.
        assert missing.startswith("it refused a client without a certificate ("), missing
        unknown = certificate_problem("127.0.0.1", port, str(certs.ca), str(stranger.client_cert), str(stranger.client_key))
        assert unknown.startswith(f"it refused the client certificate {stranger.client_cert}"), unknown


def test_other_failures_are_no_diagnosis(certs):
    with socket.create_server(("127.0.0.1", 0)) as plain:  # accepts, never answers: a timeout, not a certificate
        port = plain.getsockname()[1]
        assert certificate_problem("127.0.0.1", port, str(certs.ca), timeout_s=0.5) is None
    # closed now: refused
    assert certificate_problem("127.0.0.1", port, str(certs.ca)) is None
