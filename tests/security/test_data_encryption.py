"""The dataset store encrypted at rest with `spe encryption` (ext4 fscrypt) on a real
filesystem: a DuckDB dataset written there leaves no plaintext on the device (control: the same
bytes written to a plain folder of that device are found), a remount forgets the key so the
files cannot be read, `unlock` with another key file is refused and with the right one the
dataset is readable again; doctor counts the folder as encrypted only once set up."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from spe.cli.doctor_checks import run_checks
from spe.cli.main import app
from spe.config import Settings
from tests.fscrypt_fs import AVAILABLE, REASON, fscrypt_filesystem, remount
from workspaces.settings import WorkspaceSettings

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=REASON)

MARKER = "diagnosis-C50.9-of-patient-4711"
CONTROL = "diagnosis-I21.0-of-patient-0815"  # written to a plain folder of the same device


def _key(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(48))
    os.close(fd)
    return path


def _write_dataset(folder: Path, text: str) -> None:
    con = duckdb.connect(str(folder / "demo.duckdb"))
    con.execute(f"CREATE TABLE t AS SELECT '{text}' AS note FROM range(1000)")
    con.close()


def _encrypted_ok(data_dir: Path, part: str) -> bool:
    checks = {c.name: c for c in run_checks(Settings(data_dir=data_dir), WorkspaceSettings())}
    return checks[f"encryption at rest: {part}"].ok


def test_store_encrypted_with_fscrypt(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700)
    key, other = _key(etc / "data.key"), _key(etc / "other.key")
    runner = CliRunner()
    with fscrypt_filesystem(tmp_path) as fs:
        data = fs / "var"
        store, plain = data / "store", data / "plain"
        data.mkdir()
        plain.mkdir()
        assert not _encrypted_ok(data, "dataset store")
        res = runner.invoke(app, ["encryption", "setup", str(store), "--key-file", str(key)])
        assert res.exit_code == 0, res.output
        assert _encrypted_ok(data, "dataset store")
        assert not _encrypted_ok(data, "extracts")
        _write_dataset(store, MARKER)
        _write_dataset(plain, CONTROL)
        (store / "again").mkdir()
        res = runner.invoke(app, ["encryption", "setup", str(store), "--key-file", str(key)])
        assert res.exit_code == 1 and "not empty" in res.output
        os.sync()
        remount(tmp_path)
        device = (tmp_path / "fs.img").read_bytes()
        assert CONTROL.encode() in device  # the control: a plain folder shows its data
        assert MARKER.encode() not in device
        assert "demo.duckdb" not in os.listdir(store)  # names are ciphertext without the key
        with pytest.raises(OSError):
            (store / os.listdir(store)[0]).read_bytes()
        res = runner.invoke(app, ["encryption", "unlock", str(store), "--key-file", str(other)])
        assert res.exit_code == 1 and "not the key" in res.output
        res = runner.invoke(app, ["encryption", "unlock", str(store), "--key-file", str(key)])
        assert res.exit_code == 0, res.output
        con = duckdb.connect(str(store / "demo.duckdb"), read_only=True)
        assert con.execute("SELECT count(*), min(note) FROM t").fetchone() == (1000, MARKER)
        con.close()
