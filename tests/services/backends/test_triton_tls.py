"""Gateway -> Triton over TLS: a real tritonserver with `--grpc-use-ssl` and client certificates required
(`--grpc-use-ssl-mutual`, the session's `tls_triton`), certificates from the openssl CLI; TritonBackend with and
without the right ones."""

from __future__ import annotations

import pytest

from services.backends.backend import BackendCredentialsRejected, BackendUnavailable
from services.backends.triton_backend import TritonBackend, TritonClientTLS
from services.triton import TritonTLS
from tests.tls_certs import make_certs


@pytest.fixture
def certs(triton_certs):
    """The CA and certificates of the shared mutual-TLS tritonserver `tls_triton` (tests/services/conftest.py)."""
    return triton_certs


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
    with pytest.raises(BackendUnavailable) as raised:
        await _start(tls_triton.grpc_url, tls)
    # A certificate problem is named (services/tls_probe.py) and is not worth retrying; a plaintext client is not
    # diagnosed (it never starts a handshake).
    assert isinstance(raised.value, BackendCredentialsRejected) == (case != "plaintext"), raised.value
    if case != "plaintext":
        assert str(raised.value).startswith(f"TLS to Triton at {tls_triton.grpc_url} fails: "), raised.value


def test_tls_options_are_checked(certs, tmp_path):
    with pytest.raises(ValueError, match="both --triton-cert and --triton-key"):
        TritonClientTLS(cert=str(certs.client_cert))
    with pytest.raises(ValueError, match="--triton-ca: cannot read the Triton file"):
        TritonClientTLS(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="not a file"):
        TritonTLS(cert=str(tmp_path / "missing.crt"), key=str(certs.server_key))
    flags = TritonTLS(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(certs.ca)).flags()
    assert "--grpc-use-ssl=true" in flags and "--grpc-use-ssl-mutual=true" in flags


def _rollout(tls_triton, tmp_path, *tls_args: str):
    from click.testing import CliRunner

    from services.cli import main

    return CliRunner().invoke(main, ["rollout", "--backend", "triton", "--triton-url", tls_triton.grpc_url, "--steps", "2",
                                     "--actions", "0,1", "--prompt", "0", "--out", str(tmp_path / "r.gif"), *tls_args])


def test_genie_rollout_over_tls_and_without_it(tls_triton, certs, tmp_path, trained_world_dir):
    ok = _rollout(tls_triton, tmp_path, "--world", str(trained_world_dir), "--triton-ca", str(certs.ca),
                  "--triton-cert", str(certs.client_cert), "--triton-key", str(certs.client_key))
    assert ok.exit_code == 0, (ok.output, ok.exception)
    assert (tmp_path / "r.gif").is_file()
    plain = _rollout(tls_triton, tmp_path, "--world", str(trained_world_dir))
    lines = plain.output.strip().splitlines()
    assert plain.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "unavailable" in lines[0], lines


def test_triton_serve_passes_the_tls_flags(certs, trained_world_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from services.triton.cli import triton

    args = ["serve", "--world", str(trained_world_dir), "--repository", str(tmp_path / "repo"), "--dry-run",
            "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca)]
    result = CliRunner().invoke(triton, args)
    assert result.exit_code == 0, result.output
    command = json.loads(result.output.strip().splitlines()[-1])["command"]
    assert "--grpc-use-ssl=true" in command and f"--grpc-server-cert={certs.server_cert}" in command
    assert "--grpc-use-ssl-mutual=true" in command
    # Triton's HTTP endpoint serves inference in plaintext: with TLS it stays on loopback unless asked for.
    opened = args[:1] + ["--host", "0.0.0.0"] + args[1:]
    for extra, address in (([], "127.0.0.1"), (["--http-host", "0.0.0.0"], "0.0.0.0")):
        result = CliRunner().invoke(triton, opened + extra)
        command = json.loads(result.output.strip().splitlines()[-1])["command"]
        assert f"--http-address={address}" in command and "--grpc-address=0.0.0.0" in command, (extra, command)
    plain = CliRunner().invoke(triton, opened[:-6])
    assert "--http-address=0.0.0.0" in json.loads(plain.output.strip().splitlines()[-1])["command"]
    bad = CliRunner().invoke(triton, args[:-4] + ["--tls-key", str(tmp_path / "nope.key")])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "not a file" in bad.output, bad.output


async def test_renewed_client_files_are_used_without_a_restart(tls_triton, certs, tmp_path):
    """The gateway's client certificate files change under it (a renewed Secret): new connections use them. Swapping
    in a certificate the server does not trust makes calls fail, and swapping the good one back makes them work,
    on the same TritonBackend: the files are read again, not only at start."""
    import shutil

    mount = tmp_path / "mount"
    mount.mkdir()
    for name, src in (("ca.crt", certs.ca), ("tls.crt", certs.client_cert), ("tls.key", certs.client_key)):
        shutil.copy(src, mount / name)
    stranger = make_certs(tmp_path / "stranger", name="stranger")
    tls = TritonClientTLS(str(mount / "ca.crt"), str(mount / "tls.crt"), str(mount / "tls.key"))
    backend = TritonBackend(tls_triton.grpc_url, timeout_s=10.0, retries=0, tls=tls, tls_check_s=0.0)
    try:
        await backend.start()
        assert await backend.ready()
        shutil.copy(stranger.client_cert, mount / "tls.crt")  # signed by a CA the server does not trust
        shutil.copy(stranger.client_key, mount / "tls.key")
        assert not await backend.ready()
        shutil.copy(certs.client_cert, mount / "tls.crt")
        shutil.copy(certs.client_key, mount / "tls.key")
        assert await backend.ready()
        assert len(backend._retired) == 2  # the connections made with the earlier files, closed after a grace
    finally:
        await backend.close()
    assert not backend._retired
