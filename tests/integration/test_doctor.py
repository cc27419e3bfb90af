"""`spe doctor` names each production control that is missing, and passes those in place."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spe.cli.doctor_checks import is_encrypted, run_checks
from spe.cli.main import app
from spe.config import Settings, get_settings


def _prod(tmp_path: Path, **extra: object) -> Settings:
    store = tmp_path / "var" / "store"
    store.mkdir(parents=True, mode=0o700)
    values: dict[str, object] = {
        "profile": "prod", "data_dir": tmp_path / "var",
        "secret_key": secrets.token_urlsafe(48),
        "keycloak_admin_password": secrets.token_urlsafe(24),
        "console_client_secret": secrets.token_urlsafe(24),
        "database_url": "postgresql+psycopg://spe@db.internal:5432/spe",
        "public_url": "https://spe.example.org", "keycloak_url": "https://id.example.org",
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


def _missing(s: Settings) -> set[str]:
    return {c.name for c in run_checks(s) if not c.ok}


def test_a_production_profile_passes_its_controls(tmp_path: Path) -> None:
    missing = _missing(_prod(tmp_path))
    # Encryption at rest needs dm-crypt volumes this test machine does not give it; secrets
    # inline, a store owned by the test's user and a Keycloak (id.example.org) that does not
    # answer are switched on in test_production_profile.py, which starts the whole profile.
    assert missing <= {"encryption at rest: dataset store", "encryption at rest: extracts",
                       "encryption at rest: workspace disk images", "workspace sandbox",
                       "secrets from files", "API runs as a service user",
                       "Keycloak in production mode over TLS"}


@pytest.mark.parametrize(("switch_off", "name"), [
    ({"profile": "test"}, "production profile"),
    ({"console_client_secret": "spe-console-dev-secret"}, "server secrets"),
    ({"database_url": None}, "control database on PostgreSQL"),
    ({"public_url": "http://spe.example.org"}, "TLS for the API"),
    ({"keycloak_url": None}, "Keycloak in production mode over TLS"),
    ({"keycloak_url": "http://id.example.org"}, "Keycloak in production mode over TLS"),
])
def test_each_control_switched_off_is_named(tmp_path: Path, switch_off: dict[str, object],
                                            name: str) -> None:
    assert name in _missing(_prod(tmp_path, **switch_off))


def test_an_open_store_is_named(tmp_path: Path) -> None:
    s = _prod(tmp_path)
    s.store_dir.chmod(0o755)
    assert "dataset store private to the service" in _missing(s)


def test_development_install_fails_with_the_list(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SPE_CONFIG", str(tmp_path / "none.toml"))
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["doctor", "--json"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 1
    checks = {c["name"]: c for c in json.loads(res.output)}
    for name in ("production profile", "server secrets", "control database on PostgreSQL",
                 "TLS for the API", "encryption at rest: dataset store",
                 "secrets from files"):
        assert checks[name]["ok"] is False and checks[name]["fix"], name


def test_plain_directories_are_not_encrypted(tmp_path: Path) -> None:
    assert is_encrypted(tmp_path) is False
    assert is_encrypted(Path("/proc")) is False
