"""Gateway -> Triton over TLS: a real tritonserver with `--grpc-use-ssl` and client certificates required
(`--grpc-use-ssl-mutual`), certificates from the openssl CLI; TritonBackend with and without the right ones."""

from __future__ import annotations

import pytest

from services.gateway.backend import BackendUnavailable
from services.gateway.triton_backend import TritonBackend, TritonClientTLS
from services.triton import TritonServer, TritonTLS, assemble_repository, free_ports
from tests.tls_certs import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("triton-certs"))


@pytest.fixture(scope="module")
def tls_triton(trained_world_dir, tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("triton-tls")
    repository = assemble_repository(trained_world_dir, root, threads=1)
    tls = TritonTLS(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(certs.ca))
    server = TritonServer(repository, *free_ports(3), log_path=root / "triton.log", tls=tls)
    server.start()
    try:
        server.wait_ready(timeout=180)  # readiness is HTTP, which stays plaintext
        yield server
    finally:
        server.stop()


async def _start(url: str, tls: TritonClientTLS | None) -> TritonBackend:
    backend = TritonBackend(url, timeout_s=10.0, retries=1, tls=tls)
    try:
        await backend.start()
    except BaseException:
        await backend.close()
        raise
    return backend


async def test_a_client_with_the_ca_and_its_certificate_works(tls_triton, certs):
    backend = await _start(tls_triton.grpc_url, TritonClientTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key)))
    try:
        assert backend.spec is not None and backend.lam_frames > 0  # read over TLS from the models' configs
        assert await backend.ready()
    finally:
        await backend.close()


@pytest.mark.parametrize("case", ["plaintext", "no client certificate", "another CA"])
async def test_the_wrong_credentials_give_backend_unavailable(tls_triton, certs, case, tmp_path):
    if case == "plaintext":
        tls = None
    elif case == "no client certificate":
        tls = TritonClientTLS(str(certs.ca))
    else:
        stranger = make_certs(tmp_path / "stranger", name="stranger")
        tls = TritonClientTLS(str(stranger.ca), str(certs.client_cert), str(certs.client_key))
    with pytest.raises(BackendUnavailable):
        await _start(tls_triton.grpc_url, tls)


def test_tls_options_are_checked(certs, tmp_path):
    with pytest.raises(ValueError, match="both --triton-cert and --triton-key"):
        TritonClientTLS(cert=str(certs.client_cert))
    with pytest.raises(ValueError, match="does not exist"):
        TritonClientTLS(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="not a file"):
        TritonTLS(cert=str(tmp_path / "missing.crt"), key=str(certs.server_key))
    flags = TritonTLS(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(certs.ca)).flags()
    assert "--grpc-use-ssl=true" in flags and "--grpc-use-ssl-mutual=true" in flags
