"""`spe config show` lists every setting: the SPE's and the workspaces' (with their help)."""

from __future__ import annotations

from typer.testing import CliRunner

from spe.config import Settings
from workspaces.settings import WorkspaceSettings


def test_config_show_lists_every_setting() -> None:
    from spe.cli.main import app

    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    names = {line.split(" = ", 1)[0] for line in result.output.splitlines() if " = " in line
             and not line.startswith(" ")}
    assert set(Settings.model_fields) <= names
    assert {f"ws.{name}" for name in WorkspaceSettings.model_fields} <= names
    assert "********" in result.output or not any(
        "secret" in n for n in Settings.model_fields)
