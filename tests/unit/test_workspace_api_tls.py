"""Under TLS the workspace reaches the SPE API over https with only the CA certificate bound."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from spe.cli.production import hub_tls_env, with_local_tls
from spe.config import Settings
from spe.tls import WORKSPACE_API_HOST, ensure_local_ca
from workspaces.accounts import Account
from workspaces.sandbox import CA_IN_SANDBOX, SandboxSpec, bwrap_argv, sandbox_env, write_etc
from workspaces.spawner import workspace_api_env


def test_sandbox_gets_https_api_and_only_the_ca_read_only(tmp_path: Path) -> None:
    s = with_local_tls(Settings(data_dir=tmp_path / "data"), "http://127.0.0.1:8000")
    assert s.tls_ca_file is not None and s.tls_key_file is not None
    hub_env = hub_tls_env(s)
    assert hub_env["SPE_TLS_CA_FILE"] == str(s.tls_ca_file.resolve())

    etc = tmp_path / "ws" / "etc"
    write_etc(etc, Account("spew-abc", 990, 990), api_host_ip="10.237.0.1", ca_file=s.tls_ca_file)
    assert f"10.237.0.1 {WORKSPACE_API_HOST}\n" in (etc / "hosts").read_text()
    bound = (etc / "spe-ca.pem").read_text()
    assert bound == s.tls_ca_file.read_text() and "PRIVATE KEY" not in bound

    env = workspace_api_env("http://10.237.0.1:8600", tls=True)
    assert env == {
        "SPE_API_URL": f"https://{WORKSPACE_API_HOST}:8600",
        "SSL_CERT_FILE": CA_IN_SANDBOX,
        "REQUESTS_CA_BUNDLE": CA_IN_SANDBOX,
    }
    assert workspace_api_env("http://10.237.0.1:8600", tls=False) == {
        "SPE_API_URL": "http://10.237.0.1:8600"
    }

    spec = SandboxSpec(
        account=Account("spew-abc", 990, 990), home=tmp_path / "home", etc_dir=etc, env=env
    )
    argv = bwrap_argv(spec, ["python3"])
    binds = [
        (argv[i], argv[i + 1], argv[i + 2])
        for i, a in enumerate(argv)
        if a in ("--bind", "--ro-bind", "--ro-bind-try", "--dev-bind")
    ]
    assert ("--ro-bind", str(etc / "spe-ca.pem"), CA_IN_SANDBOX) in binds
    # No key and nothing of the TLS folder is reachable: no source lies under data_dir/tls.
    tls_dir = str((tmp_path / "data" / "tls").resolve())
    assert not [b for b in binds if b[1].startswith(tls_dir) or b[1].endswith(".key")]
    assert str(s.tls_key_file) not in " ".join(argv)
    assert sandbox_env(spec)["SSL_CERT_FILE"] == CA_IN_SANDBOX

    # The leaf verifies for the name the workspace uses, with only the bound CA.
    ctx = ssl.create_default_context(cafile=str(etc / "spe-ca.pem"))
    leaf = s.tls_cert_file
    assert leaf is not None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(leaf), str(s.tls_key_file))
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        port = lsock.getsockname()[1]

        def serve() -> None:
            conn, _ = lsock.accept()
            with server.wrap_socket(conn, server_side=True) as tconn:
                tconn.recv(1)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            ctx.wrap_socket(raw, server_hostname=WORKSPACE_API_HOST) as tls,
        ):
            assert tls.version() is not None
            tls.sendall(b"x")
        t.join(5)


def test_a_key_is_never_copied_into_the_sandbox(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path / "tls")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(files.ca_file.read_text() + files.key_file.read_text())
    with pytest.raises(ValueError, match="certificates only"):
        write_etc(tmp_path / "etc", Account("spew-abc", 990, 990), ca_file=bundle)
    with pytest.raises(ValueError, match="certificates only"):
        write_etc(tmp_path / "etc2", Account("spew-abc", 990, 990), ca_file=files.key_file)


def test_doctor_names_a_certificate_the_workspaces_cannot_verify(tmp_path: Path) -> None:
    from spe.cli.doctor_checks import _tls_api
    from spe.tls import _load_ca, _make_leaf

    files = ensure_local_ca(tmp_path / "tls")
    s = Settings(
        data_dir=tmp_path / "data",
        tls_cert_file=files.cert_file,
        tls_key_file=files.key_file,
        tls_ca_file=files.ca_file,
    )
    assert WORKSPACE_API_HOST not in _tls_api(s).found
    loaded = _load_ca(files)
    assert loaded is not None
    _make_leaf(files, *loaded, ["localhost", "127.0.0.1"])  # an operator's leaf without the name
    check = _tls_api(s)
    assert not check.ok and f"does not name {WORKSPACE_API_HOST}" in check.found
