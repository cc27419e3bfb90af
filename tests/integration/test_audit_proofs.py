"""Checkpoints, keys and per-permit proofs on both databases, checked with the remote verifier
(the code an access body runs): one permit's entries verify, a withheld one is named."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spe.audit import AuditEvent, record
from spe.audit import verify_remote as vr
from spe.audit.canonical import compute_entry_hash, hashed_fields
from spe.audit.checkpoints import CheckpointLog, KeyStore
from spe.audit.merkle import MerkleTree, leaf_hash
from spe.audit.proofs import consistency, create_checkpoint, permit_bundle
from spe.db import Database

ROOT = Path(__file__).resolve().parents[2]


def _fill(db: Database, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with db.write() as s:
            record(s, AuditEvent(action="audit.test", actor=f"user{i}", role="researcher",
                                 permit_id=None if i % 3 == 2 else f"p{i % 3}",
                                 target=str(i), details={"i": i}))


def _keys(store: KeyStore) -> list[dict[str, Any]]:
    return json.loads(store.register.read_text())["keys"]


@pytest.fixture
def setup(db: Database, tmp_path: Path) -> tuple[Database, KeyStore, CheckpointLog]:
    _fill(db, 12)
    return db, KeyStore(tmp_path), CheckpointLog(tmp_path)


def test_keys_outside_the_database_and_rotation(setup: tuple[Database, KeyStore,
                                                              CheckpointLog]) -> None:
    db, keys, log = setup
    with db.read() as s:
        first = create_checkpoint(s, keys, log, "spe-test")
    key_file = keys.keys_dir / f"{first.key_id}.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert keys.keys_dir.stat().st_mode & 0o777 == 0o700
    vr.verify_checkpoint(first.to_json(), _keys(keys))
    new_id, _ = keys.rotate()
    with db.read() as s:
        second = create_checkpoint(s, keys, log, "spe-test")
    assert second.key_id == new_id != first.key_id
    published = _keys(keys)
    assert [k["valid_until"] is None for k in published] == [False, True]
    vr.verify_checkpoint(first.to_json(), published)   # old checkpoints still verify
    vr.verify_checkpoint(second.to_json(), published)
    forged = {**second.to_json(), "size": second.size + 1}
    with pytest.raises(vr.VerificationError, match="signature"):
        vr.verify_checkpoint(forged, published)
    late_old = {**first.to_json(), "time": second.time}  # signed body changed too
    with pytest.raises(vr.VerificationError):
        vr.verify_checkpoint(late_old, published)
    key_file.chmod(0o644)
    keys.rotate()  # a readable old key does not matter once rotated; the current one does
    cur = keys.keys_dir / f"{_keys(keys)[-1]['key_id']}.pem"
    cur.chmod(0o640)
    with pytest.raises(PermissionError), db.read() as s:
        create_checkpoint(s, keys, log, "spe-test")
    assert [json.loads(line)["size"] for line in log.path.read_text().splitlines()] == [12, 12]


def test_a_permits_entries_verify_and_a_withheld_one_is_named(
        setup: tuple[Database, KeyStore, CheckpointLog]) -> None:
    db, keys, log = setup
    with db.read() as s:
        cp = create_checkpoint(s, keys, log, "spe-test")
        bundle = permit_bundle(s, cp, "p0")
        other = permit_bundle(s, cp, "p1")
        nothing = permit_bundle(s, cp, "unknown")
    checkpoint = cp.to_json()
    report = vr.verify_permit_bundle(bundle, checkpoint, "p0")
    assert report.entries == 4 == len(bundle["entries"])
    assert [e["permit_seq"] for e in bundle["entries"]] == [1, 2, 3, 4]
    assert all(e["permit_id"] == "p0" for e in bundle["entries"])  # nothing of other permits
    assert vr.verify_permit_bundle(other, checkpoint, "p1").entries == 4
    assert vr.verify_permit_bundle(nothing, checkpoint, "unknown").entries == 0

    middle = copy.deepcopy(bundle)
    del middle["entries"][1]
    with pytest.raises(vr.VerificationError, match=r"entry #2 was withheld"):
        vr.verify_permit_bundle(middle, checkpoint, "p0")
    tail = copy.deepcopy(bundle)
    del tail["entries"][-1]
    with pytest.raises(vr.VerificationError, match=r"#4..#4 were withheld"):
        vr.verify_permit_bundle(tail, checkpoint, "p0")
    lower = copy.deepcopy(bundle)  # the SPE also lies about the count: the proof fails
    del lower["entries"][-1]
    lower["permit"]["count"] = 3
    with pytest.raises(vr.VerificationError, match="count is not proven"):
        vr.verify_permit_bundle(lower, checkpoint, "p0")
    changed = copy.deepcopy(bundle)
    changed["entries"][2]["outcome"] = "refused"
    with pytest.raises(vr.VerificationError, match="changed"):
        vr.verify_permit_bundle(changed, checkpoint, "p0")
    rehashed = copy.deepcopy(bundle)  # changed and re-hashed: not in the signed tree
    entry = rehashed["entries"][2]
    entry["outcome"] = "refused"
    entry["entry_hash"] = compute_entry_hash(entry["seq"], entry["prev_hash"],
                                             hashed_fields(entry))
    with pytest.raises(vr.VerificationError, match="not in the checkpoint"):
        vr.verify_permit_bundle(rehashed, checkpoint, "p0")
    mixed = copy.deepcopy(bundle)
    mixed["entries"].insert(1, other["entries"][0])
    with pytest.raises(vr.VerificationError, match="another permit"):
        vr.verify_permit_bundle(mixed, checkpoint, "p0")
    hidden = copy.deepcopy(bundle)
    hidden["permit"], hidden["entries"] = None, []
    assert "not proven" in vr.verify_permit_bundle(hidden, checkpoint, "p0").notes[0]
    stale = copy.deepcopy(bundle)
    stale["checkpoint"]["size"] = 11
    with pytest.raises(vr.VerificationError, match="verified checkpoint"):
        vr.verify_permit_bundle(stale, checkpoint, "p0")


def test_consistency_between_checkpoints(setup: tuple[Database, KeyStore,
                                                      CheckpointLog]) -> None:
    db, keys, log = setup
    with db.read() as s:
        old = create_checkpoint(s, keys, log, "spe-test")
    _fill(db, 7, start=12)
    with db.read() as s:
        new = create_checkpoint(s, keys, log, "spe-test")
        proof = consistency(s, old.size, new.size)
        assert consistency(s, new.size, new.size) == []
        with pytest.raises(ValueError):
            consistency(s, 3, new.size + 1)
    vr.verify_extends(old.to_json(), new.to_json(), proof)
    with pytest.raises(vr.VerificationError, match="rewritten or truncated"):
        vr.verify_extends(old.to_json(), {**new.to_json(), "root": "00" * 32}, proof)
    with pytest.raises(vr.VerificationError):
        vr.verify_extends(old.to_json(), new.to_json(), proof[:-1])


def test_remote_verifier_agrees_with_the_project_code() -> None:
    for n in range(1, 20):
        leaves = [leaf_hash(bytes([i])) for i in range(n)]
        tree = MerkleTree(leaves)
        for i in range(n):
            assert vr.verify_inclusion(leaves[i], i, n, tree.inclusion_proof(i), tree.root())
        for m in range(1, n + 1):
            old = MerkleTree(leaves[:m]).root()
            assert vr.verify_consistency(m, n, old, tree.root(), tree.consistency_proof(m))
    entry = {"seq": 3, "prev_hash": "ab" * 32, "time": "2026-01-01T00:00:00.000000+00:00",
             "actor": "a", "role": None, "permit_id": "p", "action": "x.y", "target": None,
             "outcome": "success", "reason": None, "request_id": "r", "details": {"k": [1]},
             "salt": "00" * 16, "permit_seq": 2}
    assert vr.entry_hash(entry) == compute_entry_hash(3, "ab" * 32, hashed_fields(entry))


def test_remote_verifier_runs_without_the_spe(tmp_path: Path) -> None:
    """The file imports with only the standard library and cryptography."""
    path = str(ROOT / "spe" / "audit" / "verify_remote.py")
    script = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('spe', 'sqlalchemy', 'pydantic', 'fastapi', 'permits'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location('verify_remote', {path!r})
mod = importlib.util.module_from_spec(spec)
sys.modules['verify_remote'] = mod
spec.loader.exec_module(mod)
print(mod.main(['--url', 'http://127.0.0.1:1', '--permit', 'p', '--token-env', 'NO_SUCH_VAR']))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2" and "NO_SUCH_VAR" in out.stderr


def test_concurrent_checkpoints_are_appended_in_size_order(db: Database, tmp_path: Path) -> None:
    import threading

    from spe.api.routers.audit import sign_checkpoint
    from spe.api.state import AppState
    from spe.config import Settings

    state = AppState(settings=Settings(data_dir=tmp_path, database_url=db.url), db=db)
    errors: list[BaseException] = []

    def writer() -> None:
        _fill(db, 30)

    def signer() -> None:
        try:
            for _ in range(5):
                sign_checkpoint(state)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=signer)
                                                   for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sizes = [cp.size for cp in CheckpointLog(tmp_path).all()]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
