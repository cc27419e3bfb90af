import pytest
from pydantic import ValidationError

from spe.config import Settings


def test_dev_profile_accepts_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPE_PROFILE", raising=False)
    assert Settings(profile="dev").profile == "dev"


@pytest.mark.parametrize("profile", ["test", "prod"])
def test_default_secrets_refused_outside_dev(profile: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(profile=profile)
    assert "secret_key" in str(err.value)
    assert "keycloak_admin_password" in str(err.value)


def test_prod_with_real_secrets_loads() -> None:
    s = Settings(profile="prod", secret_key="x" * 40, keycloak_admin_password="s3cret-pw")
    assert s.profile == "prod"
    assert "x" * 40 not in str(s.describe())


def test_toml_file_and_env_precedence(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "spe.toml"
    cfg.write_text('api_port = 9001\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("SPE_CONFIG", str(cfg))
    monkeypatch.setenv("SPE_LOG_LEVEL", "ERROR")
    s = Settings()
    assert s.api_port == 9001
    assert s.log_level == "ERROR"


def test_unknown_option_and_bad_url_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "spe.toml"
    cfg.write_text("no_such_option = 1\n")
    monkeypatch.setenv("SPE_CONFIG", str(cfg))
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("SPE_CONFIG")
    with pytest.raises(ValidationError):
        Settings(database_url="mysql://x")


def test_every_option_documented() -> None:
    for row in Settings().describe():
        assert row["help"], row["name"]
