"""Symbolic links planted by a workspace in its own home must never make root (the spawner)
write, chown or chmod anything outside that home.

The workspace user owns its home and it persists between spawns; the spawner, as root, writes
the Ray auth token into ``~/.ray/auth_token`` at every spawn. A link planted there by the
previous session must not be followed onto the host. Needs root and bubblewrap; everything
created is removed even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces.ray_head import write_token
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv",
)


@pytest.fixture
def provision(tmp_path: Path) -> Iterator[object]:
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    ws_id = f"t{uuid.uuid4().hex[:11]}"
    made: list[Workspace] = []

    def make() -> Workspace:
        ws = Workspace.provision(
            workspaces_dir=tmp_path / "var" / "workspaces", person="mallory", permit_id="P-1",
            quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), settings=settings,
            with_network=False, ws_id=ws_id)
        made.append(ws)
        return ws

    yield make
    for ws in made:
        ws.destroy(remove_home=True)


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    """A root-owned directory and file outside every workspace (stands in for /etc/shadow)."""
    d = tmp_path / "host-etc"
    d.mkdir(mode=0o755)
    secret = d / "shadow"
    secret.write_text("root:$y$host-secret\n")
    secret.chmod(0o600)
    return secret


def _unchanged(secret: Path) -> None:
    for path in (secret.parent, secret):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
    assert secret.parent.stat().st_mode & 0o777 == 0o755
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secret.read_text() == "root:$y$host-secret\n"
    assert not (secret.parent / "auth_token").exists()


@pytest.mark.parametrize("plant", ["dir", "file"])
def test_token_write_never_follows_planted_links(provision, host_secret: Path,
                                                  plant: str) -> None:
    # The attack, as root would do it on a plain directory: following the link works.
    probe = host_secret.parent.parent / "probe"
    probe.mkdir()
    (probe / ".ray").symlink_to(host_secret.parent)
    assert (probe / ".ray" / "shadow").read_text().startswith("root:")  # the link resolves

    ws = provision()
    link = (f"ln -s {host_secret.parent} ~/.ray" if plant == "dir" else
            f"mkdir -p ~/.ray && ln -sf {host_secret} ~/.ray/auth_token")
    proc = ws.run(["sh", "-c", link])
    assert proc.returncode == 0, proc.stderr
    ws.destroy()
    ws = provision()  # the next spawn of the same workspace
    write_token(ws.spec.home, ws.account.uid, ws.account.gid)
    _unchanged(host_secret)
    token = ws.spec.home / ".ray" / "auth_token"
    assert not (ws.spec.home / ".ray").is_symlink() and not token.is_symlink()
    st = token.lstat()
    assert (st.st_uid, st.st_mode & 0o777) == (ws.account.uid, 0o600)
    assert len(token.read_text()) == 64
    out = ws.run(["sh", "-c", "cat ~/.ray/auth_token"])
    assert out.stdout == token.read_text()
