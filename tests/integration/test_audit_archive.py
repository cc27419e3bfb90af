"""Retention archive (`spe audit archive`) on SQLite and PostgreSQL: entries backdated past the
retention period move into a signed JSON Lines file, the database drops them (raising the
archived mark), `spe audit verify` still covers them (and a checkpoint signed before), a changed
or missing archive file fails verification naming it, retention below a year is refused, and a
DELETE above the mark stays refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from spe.audit import AuditEvent, record
from spe.audit.archive import ArchiveRefused, archive_dir, archive_expired
from spe.config import Settings, get_settings
from spe.db import Database


@pytest.fixture
def env(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    monkeypatch.setenv("SPE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SPE_DATABASE_URL", db_url)
    get_settings.cache_clear()
    db = Database(db_url)
    db.upgrade()
    old = datetime.now(UTC) - timedelta(days=400)
    # 1..6 older than a year: p1 also has live entries later, p2 only old ones.
    for i, permit in enumerate(["p1", None, "p2", "p1", "p2", None]):
        with db.write() as s:
            record(s, AuditEvent(action="dp.query", actor=f"r{i}", permit_id=permit,
                                 time=old + timedelta(minutes=i)))
    for _ in range(3):  # 7..9 recent
        with db.write() as s:
            record(s, AuditEvent(action="dp.query", actor="r", permit_id="p1"))
    yield db
    db.dispose()
    get_settings.cache_clear()


def _cli(*args: str) -> tuple[int, str]:
    from spe.cli.main import app

    result = CliRunner().invoke(app, ["audit", *args])
    return result.exit_code, result.output


def _archive_file(tmp_path: Path) -> Path:
    files = sorted(archive_dir(tmp_path / "var").glob("audit-*.jsonl"))
    assert len(files) == 1
    return files[0]


def test_archive_then_verify_intact(env: Database, tmp_path: Path) -> None:
    code, out = _cli("checkpoint")  # a checkpoint over all 9 entries, held in the file
    assert code == 0, out
    code, out = _cli("archive")  # the checkpoint entry itself (10) is recent
    assert code == 0, out
    assert "archived entries 1..6 (6)" in out
    path = _archive_file(tmp_path)
    assert path.name == "audit-000000000001-000000000006.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["seq"] for e in lines[:-1]] == [1, 2, 3, 4, 5, 6]
    manifest = lines[-1]
    assert manifest["kind"] == "manifest" and manifest["count"] == 6
    assert manifest["last_hash"] == lines[5]["entry_hash"] and manifest["signature"]
    with env.read() as s:
        mark, head = s.execute(text("SELECT archived_seq, seq FROM audit_head")).one()
        kept = [r[0] for r in s.execute(text("SELECT seq FROM audit_log WHERE seq <= 6"))]
        last = s.execute(text("SELECT action, details FROM audit_log WHERE seq = :n"),
                         {"n": head}).one()
    assert mark == 6
    assert kept == [5]  # p2's newest entry stays: its sequence must not restart
    assert last[0] == "audit.archive"
    code, out = _cli("verify")
    assert code == 0, out
    assert "6 of them in signed archive files" in out and "matches 1 signed checkpoint" in out
    # A checkpoint after archiving covers the archived entries (from the files) and extends
    # the one before; its permits tree still counts p1's and p2's archived entries.
    code, out = _cli("checkpoint")
    assert code == 0, out
    held = [json.loads(line) for line in
            (tmp_path / "var" / "audit" / "checkpoints.jsonl").read_text().splitlines()]
    assert [cp["size"] for cp in held] == [9, 11] and held[1]["permits"] == 2
    from spe.audit.checkpoints import permit_leaf
    from spe.audit.merkle import MerkleTree

    # p1: entries 1, 4 archived and 7, 8, 9 live; p2: 3, 5 archived.
    expected = MerkleTree([permit_leaf("p1", 5, 9), permit_leaf("p2", 2, 5)])
    assert held[1]["permits_root"] == expected.root().hex()
    code, out = _cli("verify")
    assert code == 0 and "matches 2 signed checkpoint" in out, out
    with env.write() as s:  # p2 continues at permit_seq 3, verify still intact
        appended = record(s, AuditEvent(action="dp.query", actor="r", permit_id="p2"))
    assert appended.permit_seq == 3
    assert _cli("verify")[0] == 0
    assert _cli("archive")[1].startswith("nothing older than 365 days")
    # The database still refuses deleting a live entry above the mark.
    with pytest.raises(DBAPIError, match="append-only"), env.write() as s:
        s.execute(text("DELETE FROM audit_log WHERE seq = 7"))


def test_tampered_or_missing_archive_fails_naming_it(env: Database, tmp_path: Path) -> None:
    assert _cli("archive")[0] == 0
    path = _archive_file(tmp_path)
    original = path.read_bytes()
    lines = original.decode().splitlines()
    entry = json.loads(lines[1])
    entry["actor"] = "someone else"
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    code, out = _cli("verify")
    assert code == 1
    assert path.name in out and "BROKEN" in out
    code, out = _cli("checkpoint")  # nothing is signed over a changed archive
    assert code == 1 and path.name in out and "NOT SIGNED" in out
    # A change that leaves the line valid JSON in canonical form: caught by the signed digest.
    path.write_bytes(original.replace(b'"actor":"r1"', b'"actor":"zz"'))
    code, out = _cli("verify")
    assert code == 1 and path.name in out
    path.unlink()
    code, out = _cli("verify")
    assert code == 1
    assert "audit-000000000001-*.jsonl" in out and "missing" in out
    path.write_bytes(original)
    assert _cli("verify")[0] == 0


def test_retention_below_a_year_refused(env: Database, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least 365"):
        Settings(audit_retention_days=364)
    assert Settings().audit_retention_days == 365
    with pytest.raises(ArchiveRefused, match="at least 365"):
        archive_expired(env, tmp_path / "var", 100)
    # 400-day-old entries are not old enough for a 500-day retention: nothing archived.
    assert archive_expired(env, tmp_path / "var", 500) is None


def test_proofs_cover_archived_entries(env: Database, tmp_path: Path) -> None:
    """Consistency proofs and per-permit bundles still verify (with the standalone verifier)
    once entries are archived: archived entries are served from the checked files."""
    from spe.audit import verify_remote as vr
    from spe.audit.checkpoints import CheckpointLog, LogTampered
    from spe.audit.proofs import consistency, permit_bundle

    assert _cli("checkpoint")[0] == 0
    assert _cli("archive")[0] == 0
    assert _cli("checkpoint")[0] == 0
    data_dir = tmp_path / "var"
    before, after = CheckpointLog(data_dir).all()
    with env.read() as s:
        proof = consistency(s, before.size, after.size, data_dir)
        bundles = {p: permit_bundle(s, after, p, data_dir) for p in ("p1", "p2")}
        with pytest.raises(LogTampered, match="retention archives"):
            consistency(s, before.size, after.size)  # archived entries need the files
    vr.verify_extends(before.to_json(), after.to_json(), proof)
    assert vr.verify_permit_bundle(bundles["p1"], after.to_json(), "p1").entries == 5
    assert vr.verify_permit_bundle(bundles["p2"], after.to_json(), "p2").entries == 2
    assert [e["seq"] for e in bundles["p2"]["entries"]] == [3, 5]
    # An archived entry withheld from the bundle is caught.
    bundles["p1"]["entries"].pop(0)
    with pytest.raises(vr.VerificationError):
        vr.verify_permit_bundle(bundles["p1"], after.to_json(), "p1")


def test_file_of_an_uncommitted_run_is_ignored(env: Database, tmp_path: Path) -> None:
    """A crash after writing the file and before the deleting transaction leaves a file above
    the mark: verify notes it and stays intact; the next run rewrites it and archives."""
    folder = archive_dir(tmp_path / "var")
    folder.mkdir(parents=True)
    stale = folder / "audit-000000000001-000000000006.jsonl"
    stale.write_text("not what a run would write\n")
    code, out = _cli("verify")
    assert code == 0 and stale.name in out and "ignored" in out, out
    assert _cli("archive")[0] == 0
    assert json.loads(stale.read_text().splitlines()[-1])["kind"] == "manifest"
    code, out = _cli("verify")
    assert code == 0 and "6 of them in signed archive files" in out, out
