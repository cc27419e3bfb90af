"""The sandbox command line: namespaces, privilege drop, binds, and no secrets in argv."""

from __future__ import annotations

from pathlib import Path

from workspaces import helpers
from workspaces.accounts import Account, account_name, workspace_id
from workspaces.sandbox import SandboxSpec, bwrap_argv, sandbox_env


def test_workspace_ids_are_stable_and_distinct() -> None:
    a = workspace_id("alice", "P-1")
    assert a == workspace_id("alice", "P-1") and len(a) == 12
    assert len({a, workspace_id("bob", "P-1"), workspace_id("alice", "P-2")}) == 3
    assert len(account_name(a)) <= 32


def test_argv_isolates_and_drops_privileges(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("x")
    spec = SandboxSpec(account=Account("spew-abc", 990, 990), home=tmp_path / "home",
                       etc_dir=etc, extract=tmp_path / "extract",
                       env={"SPE_TOKEN": "secret-token-value"})
    argv = bwrap_argv(spec, ["python3", "-c", "pass"])
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-net", "--die-with-parent",
                 "--new-session", "--reuid=990", "--regid=990", "--inh-caps=-all",
                 "--bounding-set=-all", "--no-new-privs"):
        assert flag in argv, flag
    assert "secret-token-value" not in " ".join(argv)
    assert sandbox_env(spec)["SPE_TOKEN"] == "secret-token-value"
    binds = [(argv[i], argv[i + 1], argv[i + 2]) for i, a in enumerate(argv)
             if a in ("--bind", "--ro-bind", "--ro-bind-try", "--dev-bind")]
    writable = [b for b in binds if b[0] == "--bind"]
    assert writable == [("--bind", str(tmp_path / "home"), "/home/spew-abc")]
    assert ("--ro-bind", str(tmp_path / "extract"), "/data/extract") in binds
    assert argv.index(helpers.tool("setpriv")) > argv.index("--chdir")
