"""Quarantine: write-once files, private directories, no names from the researcher, no links
followed."""

from __future__ import annotations

import os
import stat
import time
import uuid
from pathlib import Path

import pytest

from spe.airlock.storage import Quarantine


def test_write_once_private_and_read_only(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    rid, fid = uuid.uuid4().hex, uuid.uuid4().hex
    q.put(rid, fid, b"sex,n\nF,120\n")
    path = tmp_path / "q" / rid / fid
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert q.get(rid, fid) == b"sex,n\nF,120\n"
    with pytest.raises(FileExistsError):
        q.put(rid, fid, b"changed")
    assert q.get(rid, fid) == b"sex,n\nF,120\n"


@pytest.mark.parametrize("bad", ["../etc", "a" * 32 + "/x", "", "ABCDEF" * 6, "0" * 31])
def test_only_server_made_ids(tmp_path: Path, bad: str) -> None:
    q = Quarantine(tmp_path / "q")
    with pytest.raises(ValueError, match="32 hex"):
        q.put(bad, uuid.uuid4().hex, b"x")
    with pytest.raises(ValueError, match="32 hex"):
        q.get(uuid.uuid4().hex, bad)


def test_links_are_not_followed(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    rid, fid = uuid.uuid4().hex, uuid.uuid4().hex
    (tmp_path / "q" / rid).mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not quarantined")
    os.symlink(target, tmp_path / "q" / rid / fid)
    with pytest.raises(OSError):
        q.get(rid, fid)
    with pytest.raises(OSError):
        q.put(rid, fid, b"x")
    assert target.read_bytes() == b"not quarantined"


def test_staged_upload_and_start_sweep(tmp_path: Path) -> None:
    """A staged file is invisible under its final name until published; the start sweep
    publishes what the database recorded and deletes the rest (after the grace period)."""
    q = Quarantine(tmp_path / "q")
    rid, kept, lost, fresh = (uuid.uuid4().hex for _ in range(4))
    for fid in (kept, lost, fresh):
        staged = q.stage(rid, fid, 10)
        staged.write(b"abc")
        with pytest.raises(OverflowError):
            staged.write(b"x" * 8)
        staged.seal()
        assert not q.exists(rid, fid)
    old = time.time() - 7200
    for fid in (kept, lost):
        os.utime(tmp_path / "q" / rid / f"{fid}.part", (old, old))
    assert q.sweep(lambda r, f: f == kept) == (1, 1)
    assert q.get(rid, kept) == b"abc"
    assert not (tmp_path / "q" / rid / f"{lost}.part").exists()
    assert (tmp_path / "q" / rid / f"{fresh}.part").exists()  # maybe in flight elsewhere
    staged = q.stage(rid, uuid.uuid4().hex, 10)
    staged.write(b"a")
    staged.discard()
    assert {p.name for p in (tmp_path / "q" / rid).iterdir()} == {kept, f"{fresh}.part"}
