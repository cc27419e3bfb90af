"""Merkle proofs over the stored audit log: checkpoints, consistency and per-permit bundles.

Contract
--------
* :func:`tree_at(session, size)` builds the RFC 9162 tree over entries ``1..size`` from their
  stored hashes (the last tree built is kept, keyed by size and its chain head).
* :func:`create_checkpoint` signs the current log (see ``spe.audit.checkpoints``), after checking
  that the log still extends the last checkpoint in the write-once file; it raises
  :class:`~spe.audit.checkpoints.LogTampered` (and signs nothing) when it does not.
* :func:`check_against_checkpoints` tells whether the stored log still matches every held
  checkpoint, naming the first checkpoint it contradicts.
* :func:`permit_bundle` gives one permit's entries up to a checkpoint, each with its inclusion
  proof, plus the permit's leaf in the checkpoint's permits tree with its proof: all an access
  body needs to check, with ``spe.audit.verify_remote``, that nothing of its permit is withheld,
  without seeing other permits' entries (only their salted hashes, as proof siblings).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from spe.audit.canonical import GENESIS_HASH, entry_leaf
from spe.audit.checkpoints import (
    Checkpoint,
    CheckpointLog,
    KeyStore,
    LogTampered,
    permit_leaf,
    sign,
)
from spe.audit.merkle import MerkleTree
from spe.audit.models import AuditEntry, AuditHead
from spe.audit.writer import iter_rows, row_fields

if TYPE_CHECKING:
    from spe.audit.archive import ArchivedPrefix

_cache_lock = threading.Lock()
_cache: dict[str, tuple[int, str, MerkleTree]] = {}


def _leaves(session: Session, size: int, archived: list[str] | None = None) -> list[bytes]:
    out: list[bytes] = [entry_leaf(h) for h in (archived or [])[:size]]
    last = len(out)
    while last < size:
        hashes = session.execute(
            select(AuditEntry.seq, AuditEntry.entry_hash)
            .where(AuditEntry.seq > last, AuditEntry.seq <= size)
            .order_by(AuditEntry.seq).limit(20000)).all()
        if not hashes:
            break
        for seq, digest in hashes:
            if seq != len(out) + 1:
                raise LogTampered(f"entry {len(out) + 1} is missing from the log")
            out.append(entry_leaf(digest))
        last = int(hashes[-1][0])
    if len(out) != size:
        raise LogTampered(f"the log holds {len(out)} entries, fewer than {size}")
    return out


def _chain_head(session: Session, size: int, archived: list[str] | None = None) -> str:
    if size == 0:
        return GENESIS_HASH
    if archived and size <= len(archived):
        return archived[size - 1]
    digest = session.execute(select(AuditEntry.entry_hash)
                             .where(AuditEntry.seq == size)).scalar()
    if digest is None:
        raise LogTampered(f"entry {size} is missing from the log")
    return str(digest)


def tree_at(session: Session, size: int, archived: list[str] | None = None) -> MerkleTree:
    """The Merkle tree over entries 1..size; ``archived``: the hashes of the entries moved to
    retention archives (``spe.audit.archive.archived_prefix``), needed once the archived mark
    is above 0."""
    key = str(session.get_bind().engine.url)
    head = _chain_head(session, size, archived)
    with _cache_lock:
        hit = _cache.get(key)
        if hit and hit[0] == size and hit[1] == head:
            return hit[2]
    tree = MerkleTree(_leaves(session, size, archived))
    with _cache_lock:
        _cache[key] = (size, head, tree)
    return tree


def current_size(session: Session) -> int:
    head = session.get(AuditHead, 1)
    return int(head.seq) if head is not None else 0


def permit_heads(session: Session, size: int, archived: ArchivedPrefix | None = None
                 ) -> list[tuple[str, int, int]]:
    """(permit_id, entry count, last entry seq) of every permit with entries up to ``size``
    (with ``archived``: its archived entries counted, rows at or below the mark ignored)."""
    floor = len(archived.hashes) if archived else 0
    rows = session.execute(
        select(AuditEntry.permit_id, func.count(), func.max(AuditEntry.seq))
        .where(AuditEntry.seq <= size, AuditEntry.seq > floor,
               AuditEntry.permit_id.is_not(None))
        .group_by(AuditEntry.permit_id).order_by(AuditEntry.permit_id)).all()
    heads = {str(p): (int(c), int(m)) for p, c, m in rows}
    if archived:
        for pid, (count, last) in archived.permits.items():
            live = heads.get(pid)
            heads[pid] = (count + live[0], live[1]) if live else (count, last)
    return [(p, c, m) for p, (c, m) in sorted(heads.items())]


def _permits_tree(heads: list[tuple[str, int, int]]) -> MerkleTree:
    return MerkleTree([permit_leaf(p, c, m) for p, c, m in heads])


def create_checkpoint(session: Session, keys: KeyStore, log: CheckpointLog,
                      origin: str) -> Checkpoint:
    """Sign the log as it is now and append the checkpoint to the write-once file.

    Call it with a session opened inside ``log.locked()`` when checkpoints may be made
    concurrently (the API does): a snapshot older than the last checkpoint is refused as a
    removal otherwise."""
    with log.locked():
        return _create_checkpoint(session, keys, log, origin)


def _prefix(session: Session, data_dir: Path | None) -> ArchivedPrefix | None:
    """The entries moved to retention archives (hashes, per-permit counts) from the checked
    files in ``data_dir``; None while nothing is archived. Raises LogTampered on a bad file,
    and when entries are archived but no ``data_dir`` was given."""
    head = session.get(AuditHead, 1)
    if head is None or not head.archived_seq:
        return None
    if data_dir is None:
        raise LogTampered(f"entries 1..{head.archived_seq} are in retention archives: the "
                          "data directory is needed to read them")
    from spe.audit.archive import archived_prefix  # (archive imports this module)

    return archived_prefix(data_dir, int(head.archived_seq))


def _create_checkpoint(session: Session, keys: KeyStore, log: CheckpointLog,
                       origin: str) -> Checkpoint:
    size = current_size(session)
    prefix = _prefix(session, log.path.parent.parent)
    archived = prefix.hashes if prefix else None
    tree = tree_at(session, size, archived)
    last = log.last()
    if last is not None:
        problem = _contradiction(session, last, tree)
        if problem:
            raise LogTampered(problem)
    heads = permit_heads(session, size, prefix)
    key_id, private = keys.current()
    body = Checkpoint(origin=origin, size=size, chain_head=_chain_head(session, size, archived),
                      root=tree.root().hex(), permits=len(heads),
                      permits_root=_permits_tree(heads).root().hex(),
                      time=datetime.now(UTC).isoformat(timespec="microseconds"),
                      key_id=key_id)
    checkpoint = sign(body, private)
    log.append(checkpoint)
    return checkpoint


def _contradiction(session: Session, held: Checkpoint, tree: MerkleTree) -> str | None:
    if tree.size < held.size:
        return (f"the log holds {tree.size} entries but checkpoint of {held.time} committed "
                f"to {held.size}: entries {tree.size + 1}..{held.size} were removed")
    old = MerkleTree(tree.levels[0][:held.size])
    if old.root().hex() != held.root:
        return (f"entries 1..{held.size} no longer match the checkpoint of {held.time}: "
                "the log was rewritten")
    return None


@dataclass(frozen=True)
class CheckpointCheck:
    ok: bool
    checked: int
    problem: str | None = None
    first_bad_seq: int | None = None


def check_against_checkpoints(session: Session, checkpoints: list[Checkpoint],
                              archived: list[str] | None = None) -> CheckpointCheck:
    """Does the stored log still contain, unchanged, what every checkpoint committed to?

    On a rewrite, ``first_bad_seq`` is the first entry after the last checkpoint that still
    matches (the rewrite lies between it and the first checkpoint that does not)."""
    tree = MerkleTree(_leaves_prefix(session, archived or []))
    good = 0
    for n, cp in enumerate(sorted(checkpoints, key=lambda c: c.size), 1):
        if tree.size < cp.size:
            return CheckpointCheck(False, n - 1, f"the log holds {tree.size} unbroken entries "
                                   f"but the checkpoint of {cp.time} committed to {cp.size}",
                                   tree.size + 1)
        if MerkleTree(tree.levels[0][:cp.size]).root().hex() != cp.root:
            return CheckpointCheck(False, n - 1, f"entries {good + 1}..{cp.size} do not match "
                                   f"the checkpoint of {cp.time}: the log was rewritten",
                                   good + 1)
        good = cp.size
    return CheckpointCheck(True, len(checkpoints))


def _leaves_prefix(session: Session, archived: list[str]) -> list[bytes]:
    """Leaves of the longest gap-free prefix of the log: the ``archived`` entry hashes (from
    verified retention archives, ``spe.audit.archive``) then the stored entries after them."""
    out: list[bytes] = [entry_leaf(h) for h in archived]
    for seq, digest in session.execute(select(AuditEntry.seq, AuditEntry.entry_hash)
                                       .where(AuditEntry.seq > len(archived))
                                       .order_by(AuditEntry.seq)):
        if seq != len(out) + 1:
            break
        out.append(entry_leaf(digest))
    return out


def consistency(session: Session, first: int, second: int,
                data_dir: Path | None = None) -> list[str]:
    """PROOF(first, D[second]) in hex (``data_dir``: where retention archives are, needed once
    entries are archived)."""
    if not 0 <= first <= second <= current_size(session):
        raise ValueError("sizes outside the log")
    prefix = _prefix(session, data_dir)
    tree = tree_at(session, second, prefix.hashes if prefix else None)
    return [h.hex() for h in tree.consistency_proof(first)]


def entry_json(row: Any) -> dict[str, Any]:
    """An entry as exported and proven: its hashed fields, seq and hashes."""
    return {"seq": int(row[0]), **row_fields(row), "prev_hash": row[13],
            "entry_hash": row[14]}


def permit_bundle(session: Session, checkpoint: Checkpoint, permit_id: str,
                  data_dir: Path | None = None) -> dict[str, Any]:
    """One permit's entries up to ``checkpoint`` with their proofs (see module docstring);
    entries moved to retention archives are served from the checked files in ``data_dir``."""
    prefix = _prefix(session, data_dir)
    floor = len(prefix.hashes) if prefix else 0
    tree = tree_at(session, checkpoint.size, prefix.hashes if prefix else None)
    if tree.root().hex() != checkpoint.root:
        raise LogTampered("the log no longer matches this checkpoint")
    heads = permit_heads(session, checkpoint.size, prefix)
    index = next((i for i, h in enumerate(heads) if h[0] == permit_id), None)
    entries: list[dict[str, Any]] = []
    permit: dict[str, Any] | None = None
    if index is not None:
        pid, count, last_seq = heads[index]
        permit = {"permit_id": pid, "count": count, "last_seq": last_seq, "index": index,
                  "path": [h.hex() for h in _permits_tree(heads).inclusion_proof(index)]}
        if prefix and data_dir is not None and pid in prefix.permits:
            from spe.audit.archive import archived_entries

            for entry in archived_entries(data_dir, floor, pid):
                if entry["seq"] <= checkpoint.size:
                    entries.append({**entry, "inclusion": [
                        h.hex() for h in tree.inclusion_proof(entry["seq"] - 1)]})
        seqs = [int(s) for s in session.execute(
            select(AuditEntry.seq).where(AuditEntry.permit_id == permit_id,
                                         AuditEntry.seq > floor,
                                         AuditEntry.seq <= checkpoint.size)
            .order_by(AuditEntry.seq)).scalars()]
        for seq in seqs:
            row = next(iter_rows(session, after=seq - 1, upto=seq, batch=1))
            entries.append({**entry_json(row),
                            "inclusion": [h.hex() for h in tree.inclusion_proof(seq - 1)]})
    return {"checkpoint": checkpoint.to_json(), "permit_id": permit_id, "permit": permit,
            "entries": entries}
