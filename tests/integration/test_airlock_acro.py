"""An ACRO output folder through the notebook client and the API: results.json and the files
it names go to quarantine as one request; ACRO's own results appear on each file as the
researcher's evidence and release nothing; our checks still run on every file and decide.

The folder is written as ACRO's ``finalise(folder, "json")`` writes it (``results.json`` with
``version``, ``results`` of outputs with ``status``, ``type``, ``properties``, ``files`` each
with ``sdc`` summary and cells, ``summary``, ``exception``, and a ``session_summary``); the
``acro`` package itself is not installed here (it pins an older pandas)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from permits.service import PermitService
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from tests.integration.test_airlock_api import issue, permits  # noqa: F401

pytestmark = pytest.mark.keycloak


def _sdc(threshold: int = 0, nk: int = 0, p: int = 0) -> dict[str, Any]:
    return {"summary": {"suppressed": False, "negative": 0, "missing": 0,
                        "threshold": threshold, "p-ratio": p, "nk-rule": nk,
                        "all-values-are-same": 0},
            "cells": {"negative": [], "missing": [], "threshold": [[1, 0]] * threshold,
                      "p-ratio": [], "nk-rule": [[0, 1]] * nk, "all-values-are-same": []}}


def acro_folder(root: Path) -> Path:
    """An ACRO output folder: a crosstab ACRO failed (2 small cells, one dominated), a
    regression it passed (two tables), and ACRO's own do-not-release session summary."""
    folder = root / "acro_outputs"
    folder.mkdir()
    (folder / "output_0_0.csv").write_text(
        "grant_type,2015,2016\nG,140,150\nN,4,7\nR,620,640\n")
    (folder / "output_1_0.csv").write_text("coef,estimate,std_err\nconst,1.2,0.1\nx,0.4,0.05\n")
    (folder / "output_1_1.csv").write_text("stat,value\nno. observations,1200\ndf resid,1198\n")
    (folder / "DO_NOT_RELEASE_session_summary.csv").write_text(
        "id,method,status\noutput_0,crosstab,fail\noutput_1,ols,pass\n")
    results = {
        "version": "0.4.8",
        "results": {
            "output_0": {
                "uid": "output_0", "status": "fail", "type": "table",
                "properties": {"method": "crosstab"},
                "files": [{"name": "output_0_0.csv", "sdc": _sdc(threshold=2, nk=1)}],
                "outcome": {"2015": {"G": "ok", "N": "threshold; ", "R": "ok"}},
                "command": "safe_table = acro.crosstab(df.grant_type, df.year)",
                "summary": "fail; threshold: 2 cells may need suppressing; nk-rule: 1 cells "
                           "may need suppressing; ",
                "timestamp": "2026-12-05T09:12:01.1", "comments": ["Table 3 of the paper"],
                "exception": "Cells N are published national figures."},
            "output_1": {
                "uid": "output_1", "status": "pass", "type": "regression",
                "properties": {"method": "ols", "dof": 1198.0},
                "files": [{"name": "output_1_0.csv", "sdc": {}},
                          {"name": "output_1_1.csv", "sdc": {}}],
                "outcome": {}, "command": "results = acro.ols(y, x)", "summary": "pass",
                "timestamp": "2026-12-05T09:13:44.0", "comments": [], "exception": ""},
            "output_2": {
                "uid": "output_2", "status": "review", "type": "custom",
                "properties": {}, "files": [{"name": "DO_NOT_RELEASE_session_summary.csv",
                                             "sdc": {}}],
                "outcome": {}, "command": "custom", "summary": "review",
                "timestamp": "2026-12-05T09:14:00.0",
                "comments": ["WARNING: DO NOT RELEASE - Session summary for output checker "
                             "use only"], "exception": ""},
        },
        "session_summary": {"DO_NOT_RELEASE": True,
                            "purpose": "Session summary for output checker use only",
                            "data": []},
    }
    (folder / "results.json").write_text(json.dumps(results, indent=4))
    return folder


def test_acro_folder_is_evidence_never_release(api_client: TestClient, api_settings: Settings,
                                               permits: PermitService,  # noqa: F811
                                               db: Database, tmp_path: Path) -> None:
    from spe.client import Client

    pid = issue(permits, export_policy={"allowed_kinds": ["csv", "json"]})
    with db.write() as s:
        token = mint_workspace_token(s, api_settings, subject="alice-subject", username="alice",
                                     permit_id=pid, workspace_id="ws-a").token
    client = Client("http://testserver", token, pid, transport=api_client._transport)
    folder = acro_folder(tmp_path)
    (folder / "stray.csv").write_text("a,n\nx,100\n")  # not named by ACRO: not sent
    got = client.export(folder, "ACRO-checked outputs for the paper")
    assert got["state"] == "in_review"  # ACRO's pass releases nothing
    files = {f["name"]: f for f in got["files"]}
    assert sorted(files) == ["DO_NOT_RELEASE_session_summary.csv", "output_0_0.csv",
                             "output_1_0.csv", "output_1_1.csv", "results.json"]

    def checks(name: str) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in files[name]["checks"]}

    table = checks("output_0_0.csv")
    assert table["acro_evidence"]["outcome"] == "needs_review"
    assert table["acro_evidence"]["details"]["acro_status"] == "fail"
    assert table["acro_evidence"]["details"]["sdc"] == {
        "suppressed": False, "negative": 0, "missing": 0, "threshold": 2, "p-ratio": 0,
        "nk-rule": 1, "all-values-are-same": 0}
    assert "exception" in table["acro_evidence"]["reason"]
    # Our own checks ran on the file too (a wide crosstab has no count column by name, so
    # reviewers check its cells: ACRO's "fail" is shown beside it, not used instead of it).
    assert table["cell_counts"]["outcome"] == "needs_review"
    assert table["identifiers"]["outcome"] == "pass" and "encoded_content" in table

    regression = checks("output_1_0.csv")
    assert regression["acro_evidence"]["details"]["acro_status"] == "pass"
    assert files["output_1_0.csv"]["outcome"] == "needs_review"  # ACRO's pass is not ours
    summary = checks("DO_NOT_RELEASE_session_summary.csv")
    assert summary["acro_evidence"]["outcome"] == "fail"
    bundle = checks("results.json")
    assert bundle["acro_bundle"]["outcome"] == "pass"
    assert bundle["human_review"]["outcome"] == "needs_review"


def test_folder_without_a_file_acro_names_is_refused_before_upload(
        api_client: TestClient, api_settings: Settings, permits: PermitService,  # noqa: F811
        db: Database, tmp_path: Path) -> None:
    from spe.client import Client

    pid = issue(permits, export_policy={"allowed_kinds": ["csv", "json"]})
    with db.write() as s:
        token = mint_workspace_token(s, api_settings, subject="alice-subject", username="alice",
                                     permit_id=pid, workspace_id="ws-b").token
    client = Client("http://testserver", token, pid, transport=api_client._transport)
    folder = acro_folder(tmp_path)
    (folder / "output_1_1.csv").unlink()
    with pytest.raises(ValueError, match=r"output_1_1\.csv"):
        client.export(folder, "ACRO-checked outputs for the paper")
    assert client.exports() == []
