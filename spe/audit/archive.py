"""Retention archive of the audit log: old entries move into signed JSON Lines files.

Contract
--------
* :func:`archive_expired` takes the entries after the archived mark (``audit_head.archived_seq``,
  migration 0011) whose time, and every earlier unarchived entry's time, is older than
  ``retention_days`` (at least 365, refused below). It checks their hashes and links, writes
  them to ``<data_dir>/audit/archive/audit-<first>-<last>.jsonl`` (one entry per line, exactly
  the stored fields its hash covers plus ``seq``, ``prev_hash``, ``entry_hash``; then one
  manifest line: range, count, the chain hash before the first and of the last entry, a SHA-256
  of the entry lines, time, key id and an Ed25519 signature by the checkpoint signing key over
  the manifest's canonical JSON), fsyncs file and folder, and only then, in one transaction,
  raises the mark, deletes the archived rows and records an ``audit.archive`` entry.
* The newest archived entry of each permit whose entries are all archived stays in the
  database (below the mark, ignored by verification): the writer numbers a permit's next entry
  from it, so a permit's sequence never restarts.
* A crash after the file is written and before the transaction commits leaves a file above the
  mark: verification ignores it (it says so) and the next run rewrites it.
* :func:`verify_with_archive` checks every archive file up to the mark (signature, each entry's
  hash, links, permit sequences, contiguity: a missing or changed file fails naming it), then
  continues the live chain from the last archived hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.orm import Session

from spe.audit.actions import AuditAction
from spe.audit.canonical import GENESIS_HASH, compute_entry_hash, hashed_fields
from spe.audit.checkpoints import KeyStore
from spe.audit.events import AuditEvent
from spe.audit.fast_verify import raw_rows
from spe.audit.models import AuditEntry, AuditHead
from spe.audit.proofs import entry_json
from spe.audit.writer import ChainReport, iter_rows, record
from spe.db import Database

MIN_RETENTION_DAYS = 365
ARCHIVE_VERSION = 1
_NAME = re.compile(r"^audit-(\d{12})-(\d{12})\.jsonl$")


class ArchiveRefused(Exception):
    """The archive job will not run (retention too short, or the entries to archive are
    broken: archiving them would hide the damage)."""


def archive_dir(data_dir: Path) -> Path:
    return data_dir / "audit" / "archive"


def file_name(first: int, last: int) -> str:
    return f"audit-{first:012d}-{last:012d}.jsonl"


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ArchiveRun:
    path: Path
    first_seq: int
    last_seq: int
    count: int
    deleted: int


def _cutoff_seq(session: Session, mark: int, head: int, before: datetime) -> int:
    """The last seq such that every entry in (mark, seq] is older than ``before``."""
    young = session.execute(select(func.min(AuditEntry.seq))
                            .where(AuditEntry.seq > mark, AuditEntry.time >= before)).scalar()
    return head if young is None else int(young) - 1


def _check_rows(lines: list[dict[str, Any]], prev: str, state: dict[str, int]) -> str | None:
    """Hash, link and permit-sequence check of entry lines; ``state`` is each permit's last
    permit_seq (updated). Returns the first problem or None."""
    for entry in lines:
        seq = int(entry["seq"])
        if entry.get("prev_hash") != prev:
            return f"entry {seq}: previous-hash link broken"
        if compute_entry_hash(seq, prev, hashed_fields(entry)) != entry.get("entry_hash"):
            return f"entry {seq}: entry content changed"
        pid, pseq = entry.get("permit_id"), entry.get("permit_seq")
        if pid is not None and pseq is not None:
            if pseq != state.get(pid, 0) + 1:
                return f"entry {seq}: permit sequence broken"
            state[pid] = int(pseq)
        prev = str(entry["entry_hash"])
    return None


def archive_expired(db: Database, data_dir: Path, retention_days: int, actor: str = "system",
                    role: str | None = None, now: datetime | None = None) -> ArchiveRun | None:
    """Archive the entries older than ``retention_days`` (see the module contract). Returns
    None when nothing is old enough. Schedulable: runs are serialised by the head row."""
    if retention_days < MIN_RETENTION_DAYS:
        raise ArchiveRefused(f"retention of {retention_days} days refused: audit entries are "
                             f"kept at least {MIN_RETENTION_DAYS} days")
    before = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    with db.read() as session:
        head = session.get(AuditHead, 1)
        if head is None:
            raise ArchiveRefused("the control database has no audit head: run `spe db upgrade`")
        mark, head_seq = int(head.archived_seq), int(head.seq)
        last = _cutoff_seq(session, mark, head_seq, before)
        if last <= mark:
            return None
        lines = [entry_json(row) for row in iter_rows(session, after=mark, upto=last)]
    if [e["seq"] for e in lines] != list(range(mark + 1, last + 1)):
        raise ArchiveRefused(f"entries {mark + 1}..{last} have a gap: not archived")
    prev = str(lines[0]["prev_hash"])
    if mark == 0 and prev != GENESIS_HASH:
        raise ArchiveRefused("entry 1 does not start the chain: not archived")
    problem = _check_rows(lines, prev, {})
    if problem:
        raise ArchiveRefused(f"{problem}: not archived")
    body = b"".join(_canonical(e) + b"\n" for e in lines)
    keys = KeyStore(data_dir)
    key_id, private = keys.current()
    manifest: dict[str, Any] = {
        "kind": "manifest", "version": ARCHIVE_VERSION, "first_seq": mark + 1,
        "last_seq": last, "count": len(lines), "prev_hash": prev,
        "last_hash": lines[-1]["entry_hash"], "entries_sha256": hashlib.sha256(body).hexdigest(),
        "time": datetime.now(UTC).isoformat(timespec="microseconds"), "key_id": key_id}
    manifest["signature"] = base64.b64encode(private.sign(_canonical(manifest))).decode()
    folder = archive_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / file_name(mark + 1, last)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(body + _canonical(manifest) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    table: Table = AuditEntry.__table__  # type: ignore[assignment]
    with db.write() as session:
        moved = session.execute(update(AuditHead).where(AuditHead.id == 1,
                                                        AuditHead.archived_seq == mark)
                                .values(archived_seq=last))
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise ArchiveRefused("another archive run moved the mark first: run again")
        # Each permit's newest entry stays when all its entries are archived (module contract).
        keep = (select(func.max(AuditEntry.seq)).where(AuditEntry.permit_id.is_not(None))
                .group_by(AuditEntry.permit_id).having(func.max(AuditEntry.seq) <= last))
        deleted = session.execute(
            delete(table).where(table.c.seq > mark, table.c.seq <= last,
                                table.c.seq.not_in(keep.scalar_subquery()))
        ).rowcount  # type: ignore[attr-defined]
        record(session, AuditEvent(
            action=AuditAction.AUDIT_ARCHIVE, actor=actor, role=role,
            target=path.name, details={"first_seq": mark + 1, "last_seq": last,
                                       "count": len(lines), "deleted": int(deleted),
                                       "last_hash": lines[-1]["entry_hash"],
                                       "retention_days": retention_days}))
    return ArchiveRun(path, mark + 1, last, len(lines), int(deleted))


# Verification ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveReport(ChainReport):
    """A chain report over archive files and the live log; ``file`` names a bad file,
    ``hashes`` are the archived entries' hashes (the prefix of the checkpoints' trees)."""

    file: str | None = None
    archived: int = 0
    pending: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)


def _files(data_dir: Path) -> list[tuple[int, int, Path]]:
    folder = archive_dir(data_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(found)


def pending_files(data_dir: Path, mark: int) -> list[str]:
    """Archive files above ``mark``: written by a run whose transaction did not commit."""
    return [path.name for first, _last, path in _files(data_dir) if first > mark]


def _read(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield json.loads(raw)


def _check_file(path: Path, first: int, last: int, prev: str, state: dict[str, int],
                keys: dict[str, str]) -> tuple[str | None, list[dict[str, Any]]]:
    try:
        items = list(_read(path))
    except (OSError, ValueError):
        return "unreadable", []
    if not items or items[-1].get("kind") != "manifest":
        return "no manifest line", []
    manifest, lines = dict(items[-1]), items[:-1]
    signature = str(manifest.pop("signature", ""))
    public = keys.get(str(manifest.get("key_id")))
    if public is None:
        return "signed with an unknown key", []
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public)).verify(
            base64.b64decode(signature), _canonical(manifest))
    except (InvalidSignature, ValueError):
        return "signature does not verify", []
    body = b"".join(_canonical(e) + b"\n" for e in lines)
    if (manifest.get("first_seq"), manifest.get("last_seq"), manifest.get("count")) != (
            first, last, len(lines)) or hashlib.sha256(body).hexdigest() != manifest.get(
            "entries_sha256"):
        return "entries do not match the signed manifest", []
    if [e.get("seq") for e in lines] != list(range(first, last + 1)):
        return "entries missing from the sequence", []
    if manifest.get("prev_hash") != prev:
        return "does not continue the previous archive's chain", []
    problem = _check_rows(lines, prev, state)
    if problem:
        return problem, []
    if lines[-1]["entry_hash"] != manifest.get("last_hash"):
        return "last hash does not match the signed manifest", []
    return None, lines


def verify_with_archive(session: Session, data_dir: Path) -> ArchiveReport:
    """Verify the archived prefix from its files, then the live chain from its last hash."""
    head = session.get(AuditHead, 1)
    mark = 0 if head is None else int(head.archived_seq)
    keys = {k.key_id: k.public_key for k in KeyStore(data_dir).public_keys()}
    prev = GENESIS_HASH
    state: dict[str, int] = {}
    hashes: list[str] = []
    pending: list[str] = []
    expected = 1
    for first, last, path in _files(data_dir):
        if first > mark:
            pending.append(path.name)  # written by a run that did not commit
            continue
        if first != expected or last > mark:
            return ArchiveReport(False, len(hashes), expected, "archive file out of place "
                                 f"(expected one starting at entry {expected}, up to "
                                 f"{mark} at most)", file=path.name, archived=len(hashes))
        problem, entries = _check_file(path, first, last, prev, state, keys)
        found = [str(e["entry_hash"]) for e in entries]
        if problem:
            return ArchiveReport(False, len(hashes), first, problem, file=path.name,
                                 archived=len(hashes))
        hashes += found
        prev, expected = found[-1], last + 1
    if expected <= mark:
        return ArchiveReport(False, len(hashes), expected,
                             f"archive file missing for entries {expected}..{mark}",
                             file=f"audit-{expected:012d}-*.jsonl",
                             archived=len(hashes))
    # The live chain, continuing from the last archived hash.
    upto = 2**62 if head is None else int(head.seq)
    count, expected_seq = len(hashes), mark + 1
    sha256 = hashlib.sha256
    for seq, permit_id, permit_seq, prev_hash, digest, body in raw_rows(session, upto):
        if seq <= mark:  # a permit's newest entry kept below the mark: must be the archived one
            if digest != hashes[seq - 1]:
                return ArchiveReport(False, count, seq, "entry kept below the archived mark "
                                     "differs from its archive", archived=mark)
            continue
        count += 1
        if seq != expected_seq:
            return ArchiveReport(False, count, expected_seq, "entry missing from the sequence",
                                 archived=mark)
        if prev_hash != prev:
            return ArchiveReport(False, count, seq, "previous-hash link broken", archived=mark)
        if sha256(body).hexdigest() != digest:
            return ArchiveReport(False, count, seq, "entry content changed", archived=mark)
        if permit_seq is not None and permit_id is not None:
            if permit_seq != state.get(permit_id, 0) + 1:
                return ArchiveReport(False, count, seq, "permit sequence broken",
                                     archived=mark)
            state[permit_id] = permit_seq
        prev = digest
        expected_seq += 1
    if head is not None and (head.seq != count or head.last_hash != prev):
        return ArchiveReport(False, count, count + 1,
                             "entries removed from the end of the chain", archived=mark)
    return ArchiveReport(True, count, archived=mark, pending=pending, hashes=hashes)


@dataclass(frozen=True)
class ArchivedPrefix:
    """Entries 1..mark as held by the archive files: their hashes (the first Merkle leaves)
    and, per permit, (entries archived, last archived seq)."""

    hashes: list[str]
    permits: dict[str, tuple[int, int]]


_prefix_cache: dict[tuple[str, int], ArchivedPrefix] = {}


def archived_prefix(data_dir: Path, mark: int) -> ArchivedPrefix:
    """The archived prefix up to ``mark``, each file fully checked (signature, hashes, links);
    raises :class:`~spe.audit.checkpoints.LogTampered` naming a bad or missing file. Kept per
    process by (data_dir, mark): files up to the mark never change legitimately."""
    from spe.audit.checkpoints import LogTampered

    key = (str(data_dir), mark)
    if key in _prefix_cache:
        return _prefix_cache[key]
    keys = {k.key_id: k.public_key for k in KeyStore(data_dir).public_keys()}
    prev, expected = GENESIS_HASH, 1
    state: dict[str, int] = {}
    hashes: list[str] = []
    permits: dict[str, tuple[int, int]] = {}
    for first, last, path in _files(data_dir):
        if first > mark:
            continue
        if first != expected or last > mark:
            raise LogTampered(f"archive file {path.name} is out of place")
        problem, entries = _check_file(path, first, last, prev, state, keys)
        if problem:
            raise LogTampered(f"archive file {path.name}: {problem}")
        for e in entries:
            hashes.append(str(e["entry_hash"]))
            pid = e.get("permit_id")
            if pid is not None:
                count, _ = permits.get(pid, (0, 0))
                permits[pid] = (count + 1, int(e["seq"]))
        prev, expected = hashes[-1], last + 1
    if expected <= mark:
        raise LogTampered(f"archive file missing for entries {expected}..{mark}")
    prefix = ArchivedPrefix(hashes, permits)
    _prefix_cache[key] = prefix
    return prefix


def archived_entries(data_dir: Path, mark: int, permit_id: str) -> list[dict[str, Any]]:
    """``permit_id``'s archived entries (as exported: hashed fields, seq, hashes), from the
    archive files up to ``mark`` (checked first by :func:`archived_prefix`)."""
    archived_prefix(data_dir, mark)
    out: list[dict[str, Any]] = []
    for first, _last, path in _files(data_dir):
        if first > mark:
            continue
        out += [e for e in _read(path) if e.get("kind") != "manifest"
                and e.get("permit_id") == permit_id]
    return out
