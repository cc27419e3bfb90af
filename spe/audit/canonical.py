"""The bytes an audit entry's hash covers, and the Merkle leaf of an entry.

Pure module (standard library only): the SPE's writer and verifier and the remote verifier
(``spe.audit.verify_remote``, usable without the SPE) compute entry hashes with this one code.

Contract
--------
* ``entry_hash = SHA-256(canonical JSON of {seq, prev_hash, **fields})`` with sorted keys and
  no spaces. ``fields`` are the entry's recorded columns (time as ISO 8601 with microseconds,
  actor, role, permit_id, action, target, outcome, reason, request_id, details); entries
  written since per-permit proofs exist also carry ``salt`` (16 random bytes, hex: one entry's
  hash reveals nothing of another's content, so proofs can show neighbours' hashes) and
  ``permit_seq`` (the entry's number among its permit's entries, from 1).
* The Merkle leaf of an entry is ``leaf_hash(bytes.fromhex(entry_hash))``: the tree commits to
  every entry's hash, and each entry's hash commits to its predecessor.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from spe.audit.merkle import leaf_hash

GENESIS_HASH = "0" * 64

#: The recorded columns every entry hash covers (salt and permit_seq only when present).
FIELDS = ("time", "actor", "role", "permit_id", "action", "target", "outcome", "reason",
          "request_id", "details")
V2_FIELDS = ("salt", "permit_seq")


def canonical(seq: int, prev_hash: str, fields: dict[str, Any]) -> bytes:
    body = {"seq": seq, "prev_hash": prev_hash, **fields}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def compute_entry_hash(seq: int, prev_hash: str, fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(seq, prev_hash, fields)).hexdigest()


def hashed_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """The fields of an exported entry (a JSON object) that its hash covers."""
    out = {name: entry.get(name) for name in FIELDS}
    if entry.get("salt") is not None:
        out["salt"] = entry["salt"]
        out["permit_seq"] = entry.get("permit_seq")
    return out


def entry_leaf(entry_hash_hex: str) -> bytes:
    return leaf_hash(bytes.fromhex(entry_hash_hex))
