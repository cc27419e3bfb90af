"""The production profile, started for real: the API and console over TLS from a local CA,
Keycloak in production mode (`kc.sh start`) over TLS with its own PostgreSQL database and user
(infra/keycloak/keycloak-prod.sh), the API validating that Keycloak's tokens through the CA
bundle, secrets and keys from private files, PostgreSQL for the control plane, a store owned
by a service user; `spe doctor` passes what this machine can give and names each control that
is switched off. The workspace disk images are encrypted with fscrypt (a master key file outside
the data directory); the dataset store and the extracts need dm-crypt volumes this machine does
not offer (no device mapper in this kernel), so those checks are asserted to be named."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from spe.cli.doctor_checks import run_checks
from spe.cli.main import app
from spe.config import Settings, get_settings, secret_from_env
from spe.db import Database
from spe.tls import TlsFiles, certificate_problems, ensure_local_ca, private_key_problem
from tests import fscrypt_fs
from tests.conftest import PG_URL, ROOT, _drop_pg_database, _fresh_pg_database
from tests.keycloak_fixtures import bearer, secret_of, token_endpoint
from tests.ports import free_port, free_port_pair
from workspaces.settings import WorkspaceSettings, get_workspace_settings

NOT_HERE = {  # controls this machine cannot give (see the module docstring)
    "encryption at rest: dataset store",
    "encryption at rest: extracts",
    "workspace sandbox",
}
SERVICE_UID = 65534  # nobody: the store's owner when the test runs as root


@pytest.fixture
def pg_url() -> Iterator[str]:
    _need_postgres()
    url, name = _fresh_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)


def _need_postgres() -> None:
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("SPE_TEST_POSTGRES_URL is not set in CI: PostgreSQL must be tested")
        pytest.skip("PostgreSQL not started (run scripts/services.sh start)")


@pytest.fixture(scope="module")
def prod_keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TlsFiles]]:
    """Keycloak in production mode over TLS (local CA) with its own PostgreSQL database."""
    _need_postgres()
    assert PG_URL
    script = ROOT / "infra" / "keycloak" / "keycloak-prod.sh"
    etc = tmp_path_factory.mktemp("kc-etc")
    etc.chmod(0o700)
    tls = ensure_local_ca(etc / "tls")
    db_pw, admin_pw = _secret_file(etc, "db.pw"), _secret_file(etc, "admin.pw")
    name = f"kc_prod_{secrets.token_hex(6)}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # Keycloak's own database and user, not the SPE's
        password = db_pw.read_text().strip().replace("'", "''")
        conn.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
        conn.execute(text(f"CREATE DATABASE {name} OWNER {name}"))
    pg = make_url(PG_URL)
    port = free_port_pair()
    url = f"https://127.0.0.1:{port}"
    subprocess.run([str(script), "stop"], check=False, capture_output=True)
    try:
        started = subprocess.run(
            [str(script), "start", "--port", str(port), "--hostname", url,
             "--cert", str(tls.cert_file), "--key", str(tls.key_file),
             "--db-url", f"jdbc:postgresql://{pg.host}:{pg.port}/{name}", "--db-user", name,
             "--db-password-file", str(db_pw), "--admin-password-file", str(admin_pw)],
            env={**os.environ, "SPE_KEYCLOAK_CA_FILE": str(tls.ca_file)},
            capture_output=True, text=True, timeout=400, check=False)
        if started.returncode != 0 and "no verified Keycloak" in started.stderr \
                and not os.environ.get("CI"):
            pytest.skip("the Keycloak distribution is not fetched (keycloak.sh start)")
        assert started.returncode == 0, started.stderr[-3000:]
        yield url, tls
    finally:
        subprocess.run([str(script), "stop"], check=False, capture_output=True, timeout=60)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE IF EXISTS {name}"))
        admin.dispose()


def _secret_file(directory: Path, name: str) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    return path


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """The operator's configuration directory, outside the data directory."""
    path = tmp_path / "etc"
    path.mkdir(mode=0o700)
    return path


def _prod(tmp_path: Path, etc: Path, tls: TlsFiles, db_url: str, port: int,
          **extra: object) -> Settings:
    store = tmp_path / "var" / "store"
    if not store.exists():
        store.mkdir(parents=True, mode=0o700)
        if os.geteuid() == 0:
            os.chown(store, SERVICE_UID, SERVICE_UID)  # the API's service user owns it
    values: dict[str, object] = {
        "profile": "prod", "data_dir": tmp_path / "var", "database_url": db_url,
        "api_port": port, "keycloak_url": "https://id.example.org",
        "tls_cert_file": tls.cert_file, "tls_key_file": tls.key_file, "tls_ca_file": tls.ca_file,
    }
    for name in ("secret_key", "console_client_secret", "keycloak_admin_password"):
        path = etc / f"{name}.txt"
        values[f"{name}_file"] = path if path.exists() else _secret_file(etc, f"{name}.txt")
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


def _env_of(s: Settings, etc: Path) -> dict[str, str | None]:
    """The environment that gives `spe doctor` (the CLI) these settings."""
    env: dict[str, str | None] = {"SPE_CONFIG": str(etc / "none.toml"),
                                  "SPE_WS_DISK_KEY_FILE": str(etc / "disk.key")}
    for name in ("profile", "data_dir", "database_url", "api_port", "keycloak_url",
                 "tls_cert_file", "tls_key_file", "tls_ca_file", "secret_key_file",
                 "console_client_secret_file", "keycloak_admin_password_file"):
        env[f"SPE_{name.upper()}"] = str(getattr(s, name))
    return env


def _ws(etc: Path, **extra: object) -> WorkspaceSettings:
    """Workspace settings with the disk images' master key in the operator's directory."""
    key = etc / "disk.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(48))
        os.close(fd)
    return WorkspaceSettings(**{"disk_key_file": key, **extra})  # type: ignore[arg-type]


def _missing(s: Settings, ws: WorkspaceSettings) -> set[str]:
    return {c.name for c in run_checks(s, ws) if not c.ok}


def test_local_ca_keys_are_private_and_reused(etc: Path) -> None:
    tls = ensure_local_ca(etc / "tls", ["spe.localhost"])
    assert (etc / "tls").stat().st_mode & 0o777 == 0o700
    for key in (tls.key_file, tls.key_file.with_name("ca.key")):
        assert key.stat().st_mode & 0o777 == 0o600 and private_key_problem(key) is None
    assert certificate_problems(tls.cert_file, tls.key_file, tls.ca_file, "spe.localhost") == []
    assert certificate_problems(tls.cert_file, tls.key_file, tls.ca_file, "127.0.0.1") == []
    assert certificate_problems(tls.cert_file, tls.key_file, tls.ca_file, "other.org") != []
    ca, leaf = tls.ca_file.read_bytes(), tls.cert_file.read_bytes()
    assert ensure_local_ca(etc / "tls", ["spe.localhost"]) == tls
    assert (tls.ca_file.read_bytes(), tls.cert_file.read_bytes()) == (ca, leaf)
    ensure_local_ca(etc / "tls", ["hub.localhost"])  # a new host: new leaf, same CA
    assert tls.ca_file.read_bytes() == ca and tls.cert_file.read_bytes() != leaf
    assert certificate_problems(tls.cert_file, tls.key_file, tls.ca_file, "hub.localhost") == []
    tls.key_file.chmod(0o644)
    assert any("0644" in p for p in certificate_problems(tls.cert_file, tls.key_file,
                                                          tls.ca_file, "localhost"))


def test_secret_files_are_read_and_open_ones_refused(tmp_path: Path, etc: Path) -> None:
    path = _secret_file(etc, "key.txt")
    s = Settings(data_dir=tmp_path / "var", secret_key_file=path)  # type: ignore[call-arg]
    assert s.secret_key.get_secret_value() == path.read_text().strip()
    path.chmod(0o644)
    with pytest.raises(ValueError, match="secret_key_file refused"):
        Settings(data_dir=tmp_path / "var", secret_key_file=path)  # type: ignore[call-arg]
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(ValueError, match="secret_key_file is empty"):
        Settings(data_dir=tmp_path / "var", secret_key_file=path)  # type: ignore[call-arg]
    # the hub's secrets (environment or <NAME>_FILE, which wins) follow the same rules
    env = {"SPE_HUB_OAUTH_CLIENT_SECRET": "inline", "SPE_HUB_OAUTH_CLIENT_SECRET_FILE": str(path)}
    path.write_text("from-file\n")
    assert secret_from_env("SPE_HUB_OAUTH_CLIENT_SECRET", env) == "from-file"
    assert secret_from_env("SPE_HUB_OAUTH_CLIENT_SECRET", {"SPE_HUB_OAUTH_CLIENT_SECRET": "x"}) \
        == "x"
    path.chmod(0o604)
    with pytest.raises(ValueError, match="SECRET_FILE refused"):
        secret_from_env("SPE_HUB_OAUTH_CLIENT_SECRET", env)


def test_production_profile_serves_tls_and_passes_doctor(
        tmp_path: Path, etc: Path, pg_url: str, prod_keycloak: tuple[str, TlsFiles],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from spe.api.app import create_app

    kc_url, tls = prod_keycloak  # one local CA for Keycloak and the API, as `spe up --tls`
    port = free_port()
    stack = contextlib.ExitStack()
    root = tmp_path
    if fscrypt_fs.AVAILABLE:  # the data directory on an encrypt-capable ext4 filesystem
        root = stack.enter_context(fscrypt_fs.fscrypt_filesystem(tmp_path / "dev"))
        data_key = _secret_file(etc, "data.key")
        for part in ("store", "extracts"):
            res = CliRunner().invoke(app, ["encryption", "setup", str(root / "var" / part),
                                           "--key-file", str(data_key)])
            assert res.exit_code == 0, res.output
        os.chown(root / "var" / "store", SERVICE_UID, SERVICE_UID)
    s = _prod(root, etc, tls, pg_url, port, keycloak_url=kc_url)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))  # what `spe up` does for the API
    assert s.api_base_url == f"https://127.0.0.1:{port}"
    db = Database(s.resolved_database_url)
    db.upgrade()
    server = uvicorn.Server(uvicorn.Config(
        create_app(s, db), host="127.0.0.1", port=port, log_level="warning",
        ssl_certfile=str(s.tls_cert_file), ssl_keyfile=str(s.tls_key_file)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        ok = httpx.get(f"{s.api_base_url}/healthz", verify=ssl.create_default_context(
            cafile=str(s.tls_ca_file)))
        assert ok.status_code == 200
        with pytest.raises(httpx.ConnectError):  # not trusted without the local CA
            httpx.get(f"{s.api_base_url}/healthz",
                      verify=ssl.create_default_context(cafile=certifi.where()))
        # The API validates the production Keycloak's tokens, fetched over TLS (CA bundle).
        ctx = ssl.create_default_context(cafile=str(tls.ca_file))
        token = httpx.post(token_endpoint(kc_url), verify=ctx, timeout=30, data={
            "grant_type": "client_credentials", "client_id": "hdab-alpha",
            "client_secret": secret_of("hdab-alpha")}).json()["access_token"]
        permits = httpx.get(f"{s.api_base_url}/v1/permits", verify=ctx,
                            headers=bearer(token), timeout=30)
        assert permits.status_code == 200, permits.text
        assert httpx.get(f"{s.api_base_url}/v1/permits", verify=ctx).status_code == 401
        with pytest.raises(httpx.HTTPError):  # production Keycloak serves no plain HTTP
            httpx.get(f"{kc_url.replace('https', 'http')}/realms/spe", timeout=5)
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the listener
            httpx.get(f"http://127.0.0.1:{port}/healthz")
        checks = {c.name: c for c in run_checks(s, _ws(etc))}
        missing = {name for name, c in checks.items() if not c.ok}
        if fscrypt_fs.AVAILABLE and shutil.which("bwrap"):  # everything is in place: passes
            assert missing == set(), {n: checks[n].found for n in missing}
            get_settings.cache_clear()
            get_workspace_settings.cache_clear()
            try:
                res = CliRunner().invoke(app, ["doctor"], env=_env_of(s, etc))
            finally:
                get_settings.cache_clear()
                get_workspace_settings.cache_clear()
            assert res.exit_code == 0, res.output
            assert "controls missing" not in res.output
        else:  # said, not hidden: what this machine cannot give is named
            assert missing <= NOT_HERE, {n: checks[n].found for n in missing - NOT_HERE}
            assert {n for n in NOT_HERE if n.startswith("encryption")} <= missing
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        db.dispose()
        stack.close()


@pytest.mark.parametrize(("switch_off", "name"), [
    ({"tls_cert_file": None}, "TLS for the API"),
    ({"tls_ca_file": None}, "TLS for the API"),
    ({"public_url": "https://spe.example.org"}, "TLS for the API"),  # the cert does not name it
    ({"secret_key_file": None}, "secrets from files"),
    ({"database_url": None}, "control database on PostgreSQL"),
    ({"keycloak_url": None}, "Keycloak in production mode over TLS"),
    ({"keycloak_url": "http"}, "Keycloak in production mode over TLS"),
    ({"tls_ca_file": "other CA"}, "Keycloak in production mode over TLS"),
    ({"profile": "test"}, "production profile"),
    ({"ws_disk_key_file": None}, "encryption at rest: workspace disk images"),
    ({"ws_disk_key_file": "inside"}, "encryption at rest: workspace disk images"),
])
def test_each_production_control_switched_off_is_named(
        tmp_path: Path, etc: Path, prod_keycloak: tuple[str, TlsFiles],
        switch_off: dict[str, object], name: str) -> None:
    kc_url, tls = prod_keycloak
    url = "postgresql+psycopg://spe@db.internal:5432/spe"
    assert name not in _missing(_prod(tmp_path, etc, tls, url, 8600, keycloak_url=kc_url),
                                _ws(etc))
    extra: dict[str, object] = {"keycloak_url": kc_url, **switch_off}
    ws = _ws(etc)
    if "ws_disk_key_file" in extra:
        inside = tmp_path / "var" / "disk.key"
        inside.write_bytes(os.urandom(48))
        inside.chmod(0o600)
        key = extra.pop("ws_disk_key_file")
        ws = _ws(etc, disk_key_file=inside if key == "inside" else None)
    if "secret_key_file" in extra:  # the secret then comes inline, as before files
        extra["secret_key"] = secrets.token_urlsafe(48)
    if extra["keycloak_url"] == "http":  # the same server asked over plain HTTP
        extra["keycloak_url"] = kc_url.replace("https://", "http://")
    if extra.get("tls_ca_file") == "other CA":  # a bundle without Keycloak's CA
        extra["tls_ca_file"] = ensure_local_ca(tmp_path / "other").ca_file
    assert name in _missing(_prod(tmp_path, etc, tls, url, 8600, **extra), ws)


def test_a_secret_file_opened_later_and_a_root_owned_store_are_named(tmp_path: Path,
                                                                     etc: Path) -> None:
    tls = ensure_local_ca(etc / "tls")
    s = _prod(tmp_path, etc, tls, "postgresql+psycopg://spe@db/spe", 8600)
    assert not _missing(s, _ws(etc)) & {"secrets from files", "API runs as a service user"}
    assert s.console_client_secret_file is not None
    s.console_client_secret_file.chmod(0o640)
    assert "secrets from files" in _missing(s, _ws(etc))
    if os.geteuid() != 0:
        pytest.skip("a root-owned store needs root to make (the rest was checked)")
    os.chown(s.store_dir, 0, 0)
    assert "API runs as a service user" in _missing(s, _ws(etc))
