"""The RFC 9162 Merkle tree against hand-computed small trees (the figures of RFC 6962 §2.1.3)."""

from __future__ import annotations

import hashlib

import pytest

from spe.audit.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    mth,
    node_hash,
    verify_consistency,
    verify_inclusion,
)


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


D = [f"d{i}".encode() for i in range(7)]
a, b, c, d, e, f, j = (H(b"\x00" + x) for x in D)  # leaf hashes; j is d6's leaf
g = H(b"\x01" + a + b)
h = H(b"\x01" + c + d)
i_ = H(b"\x01" + e + f)
k = H(b"\x01" + g + h)
l_ = H(b"\x01" + i_ + j)
ROOT7 = H(b"\x01" + k + l_)


def tree(n: int) -> MerkleTree:
    return MerkleTree([leaf_hash(x) for x in D[:n]])


def test_hashing_prefixes_and_empty_tree() -> None:
    assert leaf_hash(b"x") == H(b"\x00x")
    assert node_hash(b"L", b"R") == H(b"\x01LR")
    assert MerkleTree([]).root() == EMPTY_ROOT == H(b"")
    assert tree(1).root() == a
    assert tree(2).root() == g
    assert tree(3).root() == H(b"\x01" + g + c)  # 3 leaves split at 2
    assert tree(7).root() == ROOT7


def test_inclusion_paths_of_the_rfc_figure() -> None:
    t = tree(7)
    assert t.inclusion_proof(0) == [b, h, l_]
    assert t.inclusion_proof(3) == [c, g, l_]
    assert t.inclusion_proof(4) == [f, j, k]
    assert t.inclusion_proof(6) == [i_, k]
    for idx, leaf in enumerate([a, b, c, d, e, f, j]):
        assert verify_inclusion(leaf, idx, 7, t.inclusion_proof(idx), ROOT7)


def test_consistency_proofs_of_the_rfc_figure() -> None:
    t = tree(7)
    assert t.consistency_proof(3) == [c, d, g, l_]
    assert t.consistency_proof(4) == [l_]
    assert t.consistency_proof(6) == [i_, j, k]
    for m, old_root in ((3, tree(3).root()), (4, k), (6, H(b"\x01" + k + i_))):
        assert verify_consistency(m, 7, old_root, ROOT7, t.consistency_proof(m))


@pytest.mark.parametrize("n", range(1, 34))
def test_every_small_tree_matches_the_definition(n: int) -> None:
    leaves = [leaf_hash(str(x).encode()) for x in range(n)]
    t = MerkleTree(leaves)
    assert t.root() == mth(leaves)
    for idx in range(n):
        assert verify_inclusion(leaves[idx], idx, n, t.inclusion_proof(idx), t.root())
    for m in range(0, n + 1):
        old = mth(leaves[:m])
        assert verify_consistency(m, n, old, t.root(), t.consistency_proof(m))


def test_wrong_proofs_fail() -> None:
    t = tree(7)
    proof = t.inclusion_proof(3)
    assert not verify_inclusion(d, 2, 7, proof, ROOT7)       # wrong index
    assert not verify_inclusion(c, 3, 7, proof, ROOT7)       # wrong leaf
    assert not verify_inclusion(j, 6, 8, t.inclusion_proof(6), ROOT7)  # wrong size
    assert not verify_inclusion(d, 3, 7, proof[:-1], ROOT7)  # short path
    assert not verify_inclusion(d, 3, 7, [*proof, a], ROOT7)  # long path
    assert not verify_inclusion(d, 7, 7, proof, ROOT7)       # index out of range
    cons = t.consistency_proof(3)
    old = tree(3).root()
    assert not verify_consistency(3, 7, old, ROOT7, cons[:-1])
    assert not verify_consistency(3, 7, a, ROOT7, cons)
    assert not verify_consistency(4, 7, old, ROOT7, cons)
    assert not verify_consistency(3, 7, old, ROOT7, [])
    assert not verify_consistency(3, 7, old, ROOT7, [*cons[:1], b"short", *cons[2:]])


def test_a_rewritten_prefix_breaks_consistency() -> None:
    """A rewrite of any leaf of an earlier tree makes no later tree consistent with it."""
    leaves = [leaf_hash(str(x).encode()) for x in range(9)]
    held = mth(leaves[:5])
    for victim in range(5):
        forged = list(leaves)
        forged[victim] = leaf_hash(b"rewritten")
        t = MerkleTree(forged)
        assert not verify_consistency(5, 9, held, t.root(), t.consistency_proof(5))


def test_proof_arguments_checked() -> None:
    t = tree(3)
    with pytest.raises(ValueError):
        t.inclusion_proof(3)
    with pytest.raises(ValueError):
        t.consistency_proof(4)
    assert t.levels[0] == [a, b, c]
