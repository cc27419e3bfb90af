"""Verify an SPE's audit log from outside: an access body's view of its own permits.

This file depends on the Python standard library and ``cryptography`` only, so an access body
can copy it and run it without the SPE installed (``python verify_remote.py --help``); inside
the SPE it is also ``spe audit verify-remote``. It re-implements the few lines of RFC 9162
verification and the entry hashing (a test checks they agree with ``spe.audit.merkle`` and
``spe.audit.canonical``).

What it checks
--------------
1. The checkpoint is signed by a published Ed25519 key valid at the checkpoint's time (pin the
   keys with ``--keys``; without, the keys the SPE publishes now are trusted on first use).
2. A checkpoint held from an earlier run (``--state``) is extended by the new one: a consistency
   proof shows the log was neither rewritten nor truncated in between.
3. Every entry of the permit up to the checkpoint is there: the checkpoint's permits tree
   commits to the permit's entry count and last entry; each entry's hash is recomputed from its
   fields and proven in the checkpoint's tree at its position, and the permit's own sequence
   has no gap. A withheld entry is named by its number in the permit's sequence.

Library use::

    from verify_remote import Remote, verify_permit
    report = verify_permit(Remote(url, token), "permit-id", state_file=Path("held.json"))
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# --- RFC 9162 verification (same as spe.audit.merkle) -----------------------------------

EMPTY_ROOT = hashlib.sha256(b"").digest()


class VerificationError(Exception):
    """The SPE's answer does not prove what it should; the message says what failed."""


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes],
                     root: bytes) -> bool:
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if len(p) != 32 or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> bool:
    if not 0 <= first <= second:
        return False
    if first == 0:
        return not path and first_root == EMPTY_ROOT
    if first == second:
        return not path and first_root == second_root
    if not path or any(len(p) != 32 for p in path):
        return False
    proof = list(path)
    if first & (first - 1) == 0:
        proof.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


# --- entries and checkpoints (same as spe.audit.canonical / checkpoints) ------------------

_FIELDS = ("time", "actor", "role", "permit_id", "action", "target", "outcome", "reason",
           "request_id", "details")


def entry_hash(entry: dict[str, Any]) -> str:
    body: dict[str, Any] = {"seq": entry["seq"], "prev_hash": entry["prev_hash"]}
    body.update({name: entry.get(name) for name in _FIELDS})
    if entry.get("salt") is not None:
        body["salt"] = entry["salt"]
        body["permit_seq"] = entry.get("permit_seq")
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def permit_leaf(permit_id: str, count: int, last_seq: int) -> bytes:
    body = json.dumps({"permit_id": permit_id, "count": count, "last_seq": last_seq},
                      sort_keys=True, separators=(",", ":")).encode()
    return _leaf(body)


def _signed_bytes(checkpoint: dict[str, Any]) -> bytes:
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _hex(value: Any, what: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise VerificationError(f"{what} is not hexadecimal") from None
    if len(raw) != 32:
        raise VerificationError(f"{what} is not a SHA-256 hash")
    return raw


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def verify_checkpoint(checkpoint: dict[str, Any], keys: list[dict[str, Any]]) -> None:
    """The checkpoint is signed by a key that was valid at the checkpoint's time."""
    key = next((k for k in keys if k.get("key_id") == checkpoint.get("key_id")), None)
    if key is None:
        raise VerificationError("the checkpoint is signed by an unknown key")
    when = _time(str(checkpoint["time"]))
    if when < _time(key["valid_from"]) or (key.get("valid_until") and
                                           when > _time(key["valid_until"])):
        raise VerificationError("the checkpoint's time is outside its key's validity")
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    try:
        public.verify(base64.b64decode(str(checkpoint.get("signature", ""))),
                      _signed_bytes(checkpoint))
    except (InvalidSignature, ValueError):
        raise VerificationError("the checkpoint's signature does not verify") from None


def verify_extends(held: dict[str, Any], new: dict[str, Any], proof: Sequence[str]) -> None:
    """``new`` extends ``held`` (both already signature-checked)."""
    ok = verify_consistency(int(held["size"]), int(new["size"]), _hex(held["root"], "root"),
                            _hex(new["root"], "root"), [_hex(p, "proof") for p in proof])
    if not ok:
        raise VerificationError(
            f"the log of {new['size']} entries does not extend the held checkpoint of "
            f"{held['size']} entries ({held['time']}): it was rewritten or truncated")


@dataclass
class PermitReport:
    permit_id: str
    checkpoint_size: int
    entries: int
    checkpoint_time: str
    notes: list[str] = field(default_factory=list)


def verify_permit_bundle(bundle: dict[str, Any], checkpoint: dict[str, Any],
                         permit_id: str) -> PermitReport:
    """Every entry of ``permit_id`` up to ``checkpoint`` is in ``bundle``, unchanged."""
    if _signed_bytes(bundle.get("checkpoint") or {}) != _signed_bytes(checkpoint):
        raise VerificationError("the proofs are not against the verified checkpoint")
    size = int(checkpoint["size"])
    root = _hex(checkpoint["root"], "root")
    entries = list(bundle.get("entries") or [])
    permit = bundle.get("permit")
    report = PermitReport(permit_id, size, 0, str(checkpoint["time"]))
    if permit is None:
        if entries:
            raise VerificationError("entries are given without the permit's commitment")
        report.notes.append("the SPE states this permit has no entries up to the "
                            "checkpoint (an absence is not proven)")
        return report
    count, last_seq = int(permit["count"]), int(permit["last_seq"])
    if permit.get("permit_id") != permit_id or not verify_inclusion(
            permit_leaf(permit_id, count, last_seq), int(permit["index"]),
            int(checkpoint["permits"]), [_hex(p, "proof") for p in permit["path"]],
            _hex(checkpoint["permits_root"], "permits_root")):
        raise VerificationError("the permit's entry count is not proven by the checkpoint")
    previous_seq = 0
    for number, entry in enumerate(entries, 1):
        seq = int(entry["seq"])
        if entry.get("permit_id") != permit_id:
            raise VerificationError(f"entry {seq} belongs to another permit")
        if seq <= previous_seq or seq > size:
            raise VerificationError(f"entry {seq} is out of order")
        permit_seq = entry.get("permit_seq")
        if permit_seq is not None and int(permit_seq) != number:
            raise VerificationError(
                f"the permit's entry #{number} was withheld (got #{permit_seq} at entry {seq})")
        digest = entry_hash(entry)
        if digest != entry.get("entry_hash"):
            raise VerificationError(f"entry {seq} (permit entry #{number}) was changed")
        if not verify_inclusion(_leaf(bytes.fromhex(digest)), seq - 1, size,
                                [_hex(p, "proof") for p in entry.get("inclusion", [])], root):
            raise VerificationError(
                f"entry {seq} (permit entry #{number}) is not in the checkpoint's log")
        previous_seq = seq
    if len(entries) != count or previous_seq != last_seq:
        raise VerificationError(
            f"the permit's entries #{len(entries) + 1}..#{count} were withheld: the "
            f"checkpoint commits to {count} entries, the last at entry {last_seq}")
    report.entries = count
    return report


# --- the HTTP side -------------------------------------------------------------------------

class Remote:
    """A running SPE's audit API, with an access body's bearer token."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        if not url.startswith(("http://", "https://")):
            raise VerificationError("the SPE URL must be http:// or https://")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise VerificationError(f"the SPE answered {exc.code} to {path}") from None


def verify_permit(remote: Remote, permit_id: str, *, keys: list[dict[str, Any]] | None = None,
                  state_file: Path | None = None) -> PermitReport:
    """Fetch the latest checkpoint and the permit's proofs, and verify them (see module)."""
    published = remote.get("/v1/audit/keys")["keys"]
    trusted = keys if keys is not None else published
    checkpoint = remote.get("/v1/audit/checkpoints/latest")
    verify_checkpoint(checkpoint, trusted)
    held = None
    if state_file is not None and state_file.is_file():
        held = json.loads(state_file.read_text())
        verify_checkpoint(held, trusted)
        if int(held["size"]) > int(checkpoint["size"]):
            raise VerificationError(
                f"the SPE's latest checkpoint ({checkpoint['size']} entries) is older than "
                f"the held one ({held['size']} entries)")
        proof = remote.get("/v1/audit/consistency", first=held["size"],
                           second=checkpoint["size"])["proof"]
        verify_extends(held, checkpoint, proof)
    bundle = remote.get(f"/v1/audit/permits/{urllib.parse.quote(permit_id, safe='')}/proofs",
                        size=checkpoint["size"])
    report = verify_permit_bundle(bundle, checkpoint, permit_id)
    if held is not None:
        report.notes.append(f"extends the held checkpoint of {held['size']} entries")
    if state_file is not None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(checkpoint, sort_keys=True))
        os.replace(tmp, state_file)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="verify-remote",
        description="Verify one permit's audit entries against a signed checkpoint of an SPE.")
    parser.add_argument("--url", required=True, help="base URL of the SPE API")
    parser.add_argument("--permit", required=True, help="the permit id")
    parser.add_argument("--token-env", default="SPE_TOKEN",
                        help="environment variable holding the bearer token (default SPE_TOKEN)")
    parser.add_argument("--state", type=Path,
                        help="file holding the last verified checkpoint (read, then updated)")
    parser.add_argument("--keys", type=Path,
                        help="pinned public keys (the SPE's keys.json); default: trust the "
                        "keys the SPE publishes")
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env)
    if not token:
        print(f"set {args.token_env} to an access token", file=sys.stderr)
        return 2
    keys = json.loads(args.keys.read_text())["keys"] if args.keys else None
    try:
        report = verify_permit(Remote(args.url, token), args.permit, keys=keys,
                               state_file=args.state)
    except VerificationError as exc:
        print(f"NOT VERIFIED: {exc}", file=sys.stderr)
        return 1
    print(f"verified: permit {report.permit_id}: {report.entries} entries, all proven in the "
          f"checkpoint of {report.checkpoint_size} entries ({report.checkpoint_time})")
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
