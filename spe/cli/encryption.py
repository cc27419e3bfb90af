"""`spe encryption`: the dataset store and the extracts encrypted at rest with fscrypt.

Contract:
- ``spe encryption setup DIR --key-file F`` puts the *empty* folder ``DIR`` (e.g.
  ``data_dir/store``, ``data_dir/extracts``) under an fscrypt v2 policy whose key is derived
  from the master key file ``F`` (32+ bytes, mode 0600, outside the data directory; refused
  otherwise): everything written below it later is encrypted on disk (contents and names).
- ``spe encryption unlock DIR --key-file F`` adds that key to the filesystem's keyring again
  (after a reboot or a remount: the kernel forgets it then), so the services can read the
  folder. Run both as root, before the services start.
The folder's filesystem must be ext4 with the ``encrypt`` feature (``tune2fs -O encrypt``).
`spe doctor` counts a folder under such a policy (or on dm-crypt) as encrypted at rest.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Encrypt the dataset store and extracts at rest (ext4 fscrypt).",
                  no_args_is_help=True)

KEY_OPTION = typer.Option(..., "--key-file", help="Master key file (32+ random bytes, mode "
                          "0600, outside the data directory).")


def _key(directory: Path, key_file: Path) -> bytes:
    from workspaces.fscrypt import KeyFileRefused, derive_key

    try:
        return derive_key(key_file, f"data:{directory.resolve().name}")
    except KeyFileRefused as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command("setup")
def setup(directory: Path = typer.Argument(..., help="An empty folder to encrypt."),
          key_file: Path = KEY_OPTION) -> None:
    """Encrypt everything later written in the empty DIRECTORY."""
    from workspaces import fscrypt

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if any(directory.iterdir()):
        typer.echo(f"refused: {directory} is not empty (fscrypt encrypts empty folders only; "
                   "move its contents out, set up, move them back)", err=True)
        raise typer.Exit(1)
    key = _key(directory, key_file)
    try:
        fscrypt.set_policy(directory, fscrypt.add_key(directory, key))
    except OSError as exc:
        typer.echo(f"failed: {exc.strerror} (is the filesystem ext4 with the encrypt "
                   "feature, and are you root?)", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{directory} is encrypted at rest")


@app.command("unlock")
def unlock(directory: Path = typer.Argument(..., help="A folder set up before."),
           key_file: Path = KEY_OPTION) -> None:
    """Add DIRECTORY's key to its filesystem's keyring (after a reboot or remount)."""
    from workspaces import fscrypt

    want = fscrypt.policy_identifier(directory)
    if want is None:
        typer.echo(f"refused: {directory} is not encrypted (run setup first)", err=True)
        raise typer.Exit(1)
    if fscrypt.add_key(directory, _key(directory, key_file)) != want:
        typer.echo(f"refused: {key_file} is not the key of {directory}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{directory} is unlocked")
