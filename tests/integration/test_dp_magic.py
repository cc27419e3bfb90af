"""The %%dp cell magic in a real IPython shell, against the API served on loopback."""

from __future__ import annotations

from typing import Any

import httpx
import pandas as pd
import pytest
from IPython.testing.globalipapp import start_ipython

from spe.client import Client
from spe.client.magic import DPMagics
from spe.config import Settings
from spe.db import Database
from tests.integration.test_dp_api import (  # noqa: F401 - fixtures used by name
    SQL,
    Permits,
    _workspace_token,
    api_settings,
    dataset,
    omop_source,
)


@pytest.fixture(scope="module")
def shell() -> Any:
    ip = start_ipython()
    ip.run_line_magic("load_ext", "spe.client.magic")
    return ip


def test_dp_cell_magic(shell: Any, server_url: str, db: Database,
                       api_settings: Settings, dataset: str,  # noqa: F811
                       client_headers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with httpx.Client(base_url=server_url, timeout=60) as http:
        permits = Permits(http.post, client_headers("hdab-alpha"))
        try:
            pid = permits.issue("DP/0009/2026/FI")
            token = _workspace_token(db, api_settings, pid)["Authorization"].split()[1]
            magics = shell.magics_manager.registry["DPMagics"]
            assert isinstance(magics, DPMagics)
            magics.client = Client(server_url, token, pid)

            shell.run_cell_magic("dp", "--epsilon 0.2 --out by_gender", SQL)
            out = capsys.readouterr().out
            df = shell.user_ns["by_gender"]
            assert isinstance(df, pd.DataFrame) and list(df.columns) == ["gender_concept_id", "n"]
            assert "cost: epsilon 0.2" in out and "budget left: epsilon 0.8" in out
            assert token not in out

            priced = shell.run_cell_magic("spe_sql", "--dry-run --epsilon 0.3", SQL)
            assert "dry run (free)" in capsys.readouterr().out
            assert priced["cost"]["epsilon"] == pytest.approx(0.3)

            shell.run_cell_magic("dp", "--epsilon 0.2", "SELECT * FROM person")
            assert "%%dp refused" in capsys.readouterr().out  # a refusal, not a traceback
            assert magics.client.budget(plot=False).data["epsilon_spent"] == pytest.approx(0.2)
        finally:
            permits.cleanup()
