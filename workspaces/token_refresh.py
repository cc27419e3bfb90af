"""Workspace tokens that never expire under a working researcher, and work nowhere else.

Contract
--------
* At start the spawner mints the workspace's token bound to the workspace's network address
  (:func:`mint`; the API refuses it from any other address) and writes it to
  ``~/.spe/token`` in the workspace (:func:`write_token_file`); the server's environment
  names that file (``SPE_TOKEN_FILE``) next to the first token (``SPE_TOKEN``).
* While the server runs, the spawner's ``poll`` mints a fresh token every
  :func:`refresh_interval` (a third of the token lifetime) and replaces the file atomically;
  ``spe.client`` reads the file on every request, so notebooks and long jobs pick up the new
  token without noticing. Old tokens stay valid until they expire (a request in flight is not
  cut); all of them are revoked when the workspace stops.
* Root writes into a home the researcher owns: nothing in it is trusted. No symbolic link is
  followed (``.spe`` is replaced when it is not a plain directory), the file is written under
  a fresh name and renamed into place through directory file descriptors, owned by the
  workspace user, mode 0400.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path

from spe.auth.workspace_tokens import MintedToken, mint_workspace_token
from spe.config import Settings
from spe.db import Database

TOKEN_DIR = ".spe"  # noqa: S105 - a directory name
TOKEN_FILE = "token"  # noqa: S105 - a file name


def token_path(home_in_sandbox: str) -> str:
    """Where code inside the sandbox reads its newest token."""
    return f"{home_in_sandbox.rstrip('/')}/{TOKEN_DIR}/{TOKEN_FILE}"


def refresh_interval(settings: Settings) -> float:
    """Seconds between two tokens of a running workspace (a third of their lifetime)."""
    return settings.workspace_token_ttl_seconds / 3


def mint(db: Database, settings: Settings, *, person: str, permit_id: str, ws_id: str,
         address: str) -> MintedToken:
    """A new workspace token for (person, permit, workspace), bound to ``address``."""
    with db.write() as session:
        return mint_workspace_token(session, settings, subject=person, username=person,
                                    permit_id=permit_id, workspace_id=ws_id, address=address)


def write_token_file(home: Path, uid: int, gid: int, token: str) -> None:
    """Atomically put ``token`` at ``<home>/.spe/token`` (0400, owned by the workspace)."""
    home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(TOKEN_DIR, dir_fd=home_fd).st_mode):
                os.unlink(TOKEN_DIR, dir_fd=home_fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(TOKEN_DIR, 0o700, dir_fd=home_fd)
        dir_fd = os.open(TOKEN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                         dir_fd=home_fd)
    finally:
        os.close(home_fd)
    try:
        os.fchown(dir_fd, uid, gid)
        os.fchmod(dir_fd, 0o700)
        tmp = f".{TOKEN_FILE}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400,
                     dir_fd=dir_fd)
        try:
            os.write(fd, token.encode())
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o400)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(TOKEN_FILE, dir_fd=dir_fd).st_mode):
                shutil.rmtree(TOKEN_FILE, dir_fd=dir_fd)
        os.rename(tmp, TOKEN_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
