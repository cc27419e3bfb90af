"""Per-permit pseudonymised extracts (EHDS Art 66: pseudonymised only when justified).

Contract:

* ``dp_only`` permits get no extract: :func:`build_extract` removes any left from an earlier
  version and returns ``None``.
* ``pseudonymised`` permits get ``<extracts_dir>/<permit_id>/<dataset>/<table>.parquet`` with
  exactly the permitted tables and columns of each granted dataset. The privacy unit column
  (``person_id``) is replaced by a keyed pseudonym: hex HMAC-SHA256 (first 128 bits) of the id
  under a per-permit key. The same person gets the same pseudonym in every table of the permit,
  and different pseudonyms under different permits, so extracts cannot be linked across permits.
* The key is 32 random bytes in ``<keys_dir>/<permit_id>.key`` (mode 0600, root, directory
  0700), outside every workspace: sandboxes never bind it.
* A ``manifest.json`` records the permit version and the grants (datasets, tables, columns);
  :func:`build_extract` rebuilds when an amendment changed the grants, and otherwise only
  records the new version (an amendment of persons or budget leaves the data as it is). The
  new extract is written beside the old one and swapped in with renames, so a workspace never
  sees a half-built one. Files are read-only (0444, directories 0555), and the sandbox binds
  the directory read-only.
* Each build is audited (``workspace.extract_build``) when a database is given.
* :func:`sync_extract` brings a permit's extract in line with its current terms (the hub service
  calls it on ``issued``, ``amended`` and ``resumed`` events): built for an active
  ``pseudonymised`` permit, rebuilt when an amendment changed its tables or columns, removed
  (audited ``workspace.extract_remove``) when the access mode is ``dp_only``.
  The dataset files come from the registry's store; keys live in ``<data_dir>/keys``. A running
  workspace loses a removed or replaced extract at once (the files it bound are deleted) and
  binds the new one when its server restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import duckdb
import pyarrow as pa

from permits.terms import AccessMode, PermitTerms
from spe.audit import AuditEvent, record
from spe.config import Settings
from spe.db import Database

PERSON = "person_id"
PSEUDONYM_HEX = 32


def _safe(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unsafe identifier {name!r}")
    return name


def key_path(keys_dir: Path, permit_id: str) -> Path:
    return keys_dir / f"{_safe(permit_id.replace('-', '_'))}.key"


def pseudonym_key(keys_dir: Path, permit_id: str) -> bytes:
    """The permit's pseudonymisation key, created on first use (0600 in a 0700 directory)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    path = key_path(keys_dir, permit_id)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def pseudonym(key: bytes, person_id: object) -> str:
    return hmac.new(key, str(person_id).encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def _manifest(path: Path) -> dict[str, object] | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _lock_down(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)  # noqa: S103 - read-only for the permit's workspaces


def _remove(path: Path) -> None:
    if path.exists():
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)  # noqa: S103 - root-only path, made removable
        shutil.rmtree(path)


def build_extract(terms: PermitTerms, dataset_paths: Mapping[str, Path], extracts_dir: Path,
                  keys_dir: Path, *, db: Database | None = None,
                  actor: str = "system") -> Path | None:
    """Build (or keep) the permit's extract; return its directory, or None for dp_only."""
    extracts_dir.mkdir(parents=True, exist_ok=True)
    extracts_dir.chmod(0o711)
    target = extracts_dir / _safe(terms.permit_id.replace("-", "_"))
    if terms.access_mode is not AccessMode.PSEUDONYMISED:
        _remove(target)
        return None
    found = _manifest(target)
    grants = _grants(terms)
    if found is not None and found.get("grants") == grants:
        if found.get("version") != terms.version:
            manifest = target / "manifest.json"
            manifest.chmod(0o644)
            manifest.write_text(json.dumps({**found, "version": terms.version}))
            manifest.chmod(0o444)
        return target
    key = pseudonym_key(keys_dir, terms.permit_id)
    building = extracts_dir / f".{target.name}.building"
    _remove(building)
    building.mkdir()
    counts: dict[str, int] = {}
    for grant in terms.datasets:
        source = dataset_paths[grant.dataset]
        out_dir = building / _safe(grant.dataset)
        out_dir.mkdir()
        con = duckdb.connect(str(source), read_only=True)
        try:
            mapping = _person_mapping(con, grant.tables, key)
            con.register("spe_pseudonyms", mapping)
            for table, columns in sorted(grant.tables.items()):
                cols = sorted(_safe(c) for c in columns)
                if not cols:
                    continue
                select = ", ".join(
                    f"m.pseudonym AS {PERSON}" if c == PERSON else f't."{c}"' for c in cols)
                join = (f" LEFT JOIN spe_pseudonyms m ON m.person_id = CAST(t.{PERSON} AS VARCHAR)"
                        if PERSON in cols else "")
                out = out_dir / f"{_safe(table)}.parquet"
                con.execute(f'COPY (SELECT {select} FROM "{_safe(table)}" t{join}) '
                            f"TO '{out}' (FORMAT parquet)")
                counts[f"{grant.dataset}.{table}"] = len(cols)
        finally:
            con.close()
    (building / "manifest.json").write_text(json.dumps(
        {"permit_id": terms.permit_id, "version": terms.version, "tables": sorted(counts),
         "grants": grants}))
    _lock_down(building)
    old = extracts_dir / f".{target.name}.old"
    _remove(old)
    if target.exists():
        target.rename(old)
    building.rename(target)
    _remove(old)
    if db is not None:
        with db.write() as session:
            record(session, AuditEvent(action="workspace.extract_build", actor=actor,
                                       permit_id=terms.permit_id, target=terms.permit_id,
                                       details={"version": terms.version,
                                                "tables": sorted(counts)}))
    return target


def _grants(terms: PermitTerms) -> dict[str, dict[str, list[str]]]:
    return {g.dataset: {t: sorted(c) for t, c in sorted(g.tables.items())}
            for g in sorted(terms.datasets, key=lambda g: g.dataset)}


def _person_mapping(con: duckdb.DuckDBPyConnection, tables: Mapping[str, frozenset[str]],
                    key: bytes) -> pa.Table:
    ids: set[str] = set()
    for table, columns in tables.items():
        if PERSON in columns:
            rows = con.execute(
                f'SELECT DISTINCT CAST({PERSON} AS VARCHAR) FROM "{_safe(table)}"').fetchall()
            ids.update(r[0] for r in rows if r[0] is not None)
    ordered = sorted(ids)
    return pa.table({"person_id": ordered,
                     "pseudonym": [pseudonym(key, i) for i in ordered]})


def remove_extract(extracts_dir: Path, permit_id: str) -> None:
    """Delete a permit's extract (retention end, revocation)."""
    _remove(extracts_dir / _safe(permit_id.replace("-", "_")))


def extracts_dir(settings: Settings) -> Path:
    return settings.data_dir / "extracts"


def keys_dir(settings: Settings) -> Path:
    return settings.data_dir / "keys"


def sync_extract(db: Database, settings: Settings, permit_id: str, *,
                 actor: str = "system") -> str:
    """Align the permit's extract with its terms; returns ``built``, ``rebuilt``, ``kept``,
    ``removed`` or ``none`` (dp_only, nothing there)."""
    from permits.service import get_terms
    from spe.datasets.registry import dataset_path, get_dataset

    with db.read() as session:
        terms = get_terms(session, permit_id)
    out = extracts_dir(settings)
    target = out / _safe(permit_id.replace("-", "_"))
    if terms.access_mode is not AccessMode.PSEUDONYMISED:
        if not target.exists():
            return "none"
        remove_extract(out, permit_id)
        with db.write() as session:
            record(session, AuditEvent(action="workspace.extract_remove", actor=actor,
                                       permit_id=permit_id, target=permit_id,
                                       reason=f"access mode is {terms.access_mode.value}",
                                       details={"version": terms.version}))
        return "removed"
    if not terms.usable:  # suspended: built on resume; ended: deleted at retention end
        return "kept"
    before = _manifest(target)
    paths = {g.dataset: dataset_path(settings, get_dataset(db, g.dataset))
             for g in terms.datasets}
    build_extract(terms, paths, out, keys_dir(settings), db=db, actor=actor)
    if before is None:
        return "built"
    return "kept" if before.get("grants") == _grants(terms) else "rebuilt"
