"""Workspace disk images encrypted at rest with fscrypt: real ext4 images on loop devices.

A detached image holds no plaintext of what the workspace wrote (control: the same write to an
image without a key is found in its bytes); the key, derived from a master file outside the
data directory, opens it again; without the key the files cannot be read; a master file others
may read is refused. Needs root and loop devices (skipped, saying so, elsewhere).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from workspaces import disk, fscrypt

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists()
    or not Path("/sys/fs/ext4/features/encryption").exists(),
    reason="needs root, loop devices and ext4 encryption (fscrypt) in the kernel")

MARKER = "patient 4711 diagnosis C50.9"
UID = GID = 65534


@pytest.fixture
def master(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700)
    path = etc / "disk.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(48))
    return path


def _root(tmp_path: Path, name: str) -> Path:
    root = tmp_path / "var" / "workspaces" / name
    root.mkdir(parents=True, mode=0o700)
    return root


def _write(d: disk.HomeDisk) -> None:
    (d.home / "notes.txt").write_text(MARKER)
    (d.tmp / "scratch.csv").write_text(MARKER)


def _image_holds(image: Path, text: str) -> bool:
    return text.encode() in image.read_bytes()


def test_a_detached_image_holds_only_ciphertext(tmp_path: Path, master: Path) -> None:
    enc, plain = _root(tmp_path, "ws-enc"), _root(tmp_path, "ws-plain")
    key = fscrypt.workspace_key(master, "ws-enc")
    d = disk.attach(enc, size_mb=16, uid=UID, gid=GID, key=key)
    try:
        assert d.encrypted
        assert fscrypt.policy_identifier(d.home) is not None
        assert fscrypt.policy_identifier(d.tmp) == fscrypt.policy_identifier(d.home)
        _write(d)
    finally:
        disk.detach(enc)
    p = disk.attach(plain, size_mb=16, uid=UID, gid=GID)
    try:
        assert not p.encrypted and fscrypt.policy_identifier(p.home) is None
        _write(p)
    finally:
        disk.detach(plain)
    os.sync()
    assert _image_holds(plain / disk.IMAGE_NAME, MARKER)  # control: plain images show it
    assert not _image_holds(enc / disk.IMAGE_NAME, MARKER)
    assert not _image_holds(enc / disk.IMAGE_NAME, "notes.txt")  # names are encrypted too

    again = disk.attach(enc, size_mb=16, uid=UID, gid=GID, key=key)  # the key opens it again
    try:
        assert (again.home / "notes.txt").read_text() == MARKER
    finally:
        disk.detach(enc)
    locked = disk.attach(enc, size_mb=16, uid=UID, gid=GID)  # mounted without the key
    try:
        assert "notes.txt" not in os.listdir(locked.home)
        with pytest.raises(OSError):
            (locked.home / os.listdir(locked.home)[0]).read_text()
    finally:
        disk.detach(enc)


def test_keys_differ_per_workspace_and_open_master_files_are_refused(master: Path) -> None:
    assert fscrypt.workspace_key(master, "a") != fscrypt.workspace_key(master, "b")
    assert fscrypt.workspace_key(master, "a") == fscrypt.workspace_key(master, "a")
    master.chmod(0o640)
    with pytest.raises(fscrypt.KeyFileRefused):
        fscrypt.workspace_key(master, "a")
    master.chmod(0o600)
    master.write_bytes(b"short")
    with pytest.raises(fscrypt.KeyFileRefused):
        fscrypt.workspace_key(master, "a")


def test_an_older_plain_image_keeps_its_home_and_gets_an_encrypted_tmp(
        tmp_path: Path, master: Path) -> None:
    root = _root(tmp_path, "ws-old")
    d = disk.attach(root, size_mb=16, uid=UID, gid=GID)
    (d.home / "old.txt").write_text("kept")
    disk.detach(root)
    d = disk.attach(root, size_mb=16, uid=UID, gid=GID,
                    key=fscrypt.workspace_key(master, "ws-old"))
    try:
        assert not d.encrypted  # said, so the operator knows this home is still plain
        assert (d.home / "old.txt").read_text() == "kept"
        assert fscrypt.policy_identifier(d.tmp) is not None
    finally:
        disk.detach(root)


SANDBOX_TOOLS = ("bwrap", "nft", "ip", "setpriv")


@pytest.mark.skipif(not all(shutil.which(t) for t in SANDBOX_TOOLS),
                    reason="the sandbox needs bubblewrap, nftables, iproute2 and util-linux")
def test_a_sandbox_reads_and_writes_its_encrypted_home(tmp_path: Path, master: Path) -> None:
    from permits.terms import ComputeQuota
    from workspaces.sandbox import Workspace
    from workspaces.settings import WorkspaceSettings

    settings = WorkspaceSettings(allowed_host_ports=(), runtime_dir=Path("no-runtime"),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}",
                                 disk_key_file=master)
    ws = Workspace.provision(
        workspaces_dir=tmp_path / "workspaces", person="alice", permit_id="P-enc",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=32), settings=settings,
        ws_id=f"t{uuid.uuid4().hex[:11]}", with_network=False)
    try:
        code = ("import os, pathlib; h = pathlib.Path(os.path.expanduser('~'));"
                f"(h / 'n.txt').write_text({MARKER!r}); pathlib.Path('/tmp/t.txt')"
                f".write_text({MARKER!r}); print((h / 'n.txt').read_text())")
        proc = ws.run(["/usr/bin/python3", "-c", code], timeout=120)
        assert proc.stdout.strip() == MARKER, proc.stderr
        image = ws.root / disk.IMAGE_NAME
        disk.detach(ws.root)
        os.sync()
        assert not _image_holds(image, MARKER)
    finally:
        ws.destroy(remove_home=True)
