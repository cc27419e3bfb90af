"""Dedicated Unix accounts, one per (researcher, permit) workspace.

Contract:

* :func:`workspace_id` is a stable 12-hex-digit id derived from (person, permit); the account
  name is ``spew-<id>``. Same inputs, same account; different inputs never share one.
* :func:`ensure_account` creates the account (system account, own group, no login shell, no
  home created by ``useradd``) or returns the existing one. Idempotent.
* :func:`delete_account` removes it and its group; absent accounts are ignored. Idempotent.

Requires root (``useradd``/``userdel`` from the ``passwd`` package).
"""

from __future__ import annotations

import hashlib
import pwd
from dataclasses import dataclass
from pathlib import Path

from workspaces import helpers

PREFIX = "spew-"


@dataclass(frozen=True)
class Account:
    """A workspace's Unix identity."""

    name: str
    uid: int
    gid: int


def workspace_id(person: str, permit_id: str) -> str:
    """Stable id of the workspace of ``person`` under ``permit_id`` (12 hex digits)."""
    digest = hashlib.sha256(f"{person}\0{permit_id}".encode()).hexdigest()
    return digest[:12]


def account_name(ws_id: str) -> str:
    return PREFIX + ws_id


def lookup(name: str) -> Account | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def ensure_account(ws_id: str, home: Path, comment: str = "SPE workspace") -> Account:
    """Create (or find) the account of workspace ``ws_id``."""
    name = account_name(ws_id)
    found = lookup(name)
    if found is not None:
        return found
    proc = helpers.run(
        "useradd", "--system", "--user-group", "--no-create-home",
        "--home-dir", str(home), "--shell", "/usr/sbin/nologin",
        "--comment", comment[:60].replace(":", " "), name,
    )
    found = lookup(name)
    if found is None:
        raise RuntimeError(f"useradd {name} failed: {proc.stderr.strip()}")
    return found


def delete_account(name: str) -> None:
    """Remove the account and its group (no-op when absent)."""
    if not name.startswith(PREFIX):
        raise ValueError("refusing to delete an account the SPE did not create")
    if lookup(name) is None:
        return
    proc = helpers.run("userdel", name)
    if lookup(name) is not None:
        raise RuntimeError(f"userdel {name} failed: {proc.stderr.strip()}")
