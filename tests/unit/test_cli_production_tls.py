"""`spe up --tls`'s settings: a local CA in data_dir/tls for the API, the hub and the
workspaces' user domain, reused across starts; certificate files an operator set are kept."""

from __future__ import annotations

from pathlib import Path

from spe.cli.production import hub_tls_env, uvicorn_tls, with_local_tls
from spe.config import Settings
from spe.tls import certificate_problems, ensure_local_ca


def test_local_tls_names_every_listener_and_is_reused(tmp_path: Path) -> None:
    s = with_local_tls(Settings(data_dir=tmp_path / "var"), "https://hub.example.test:8000",
                       user_domain="ws.example.test")
    assert s.tls_cert_file is not None and s.tls_key_file is not None
    assert s.tls_cert_file.parent == tmp_path / "var" / "tls"
    assert s.api_base_url == "https://127.0.0.1:8600"
    for host in ("127.0.0.1", "hub.example.test", "a1b2.ws.example.test"):
        assert certificate_problems(s.tls_cert_file, s.tls_key_file, s.tls_ca_file, host) == []
    assert certificate_problems(s.tls_cert_file, s.tls_key_file, s.tls_ca_file,
                                "a.b.ws.example.test") != []  # one label only under *.
    cert = s.tls_cert_file.read_bytes()
    again = with_local_tls(Settings(data_dir=tmp_path / "var"), "https://hub.example.test:8000",
                           user_domain="ws.example.test")
    assert again.tls_cert_file is not None and again.tls_cert_file.read_bytes() == cert
    assert uvicorn_tls(s) == (str(s.tls_cert_file), str(s.tls_key_file))
    env = hub_tls_env(s)
    assert env["SPE_GATE_SSL_CERT"] == str(s.tls_cert_file.resolve())
    assert s.tls_ca_file is not None
    assert env["SSL_CERT_FILE"] == str(s.tls_ca_file.resolve())


def test_operator_certificates_are_kept_and_plain_http_without_any(tmp_path: Path) -> None:
    own = ensure_local_ca(tmp_path / "etc" / "tls")
    s = Settings(data_dir=tmp_path / "var", tls_cert_file=own.cert_file,
                 tls_key_file=own.key_file, tls_ca_file=own.ca_file)
    assert with_local_tls(s, "https://127.0.0.1:8000") is s
    assert not (tmp_path / "var" / "tls").exists()
    plain = Settings(data_dir=tmp_path / "var")
    assert uvicorn_tls(plain) == (None, None) and hub_tls_env(plain) == {}
    assert plain.api_base_url == "http://127.0.0.1:8600"
