"""Merkle tree of the audit log in the shape of RFC 9162 (Certificate Transparency 2.0), §2.1.

Pure module: standard library only, so the remote verifier can carry it without the SPE.

Contract
--------
* ``leaf_hash(data) = SHA-256(0x00 || data)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``;
  the root of the empty tree is ``SHA-256("")``. A tree of n > 1 leaves splits at the largest
  power of two smaller than n (MTH of §2.1.1).
* :class:`MerkleTree` builds every level once (O(n) hashes) and then answers the root, the
  inclusion proof of any leaf (PATH, §2.1.3.1) and the consistency proof from any earlier size
  (PROOF, §2.1.4.1) for its own size.
* :func:`verify_inclusion` and :func:`verify_consistency` are the verification algorithms of
  §2.1.3.2 and §2.1.4.2; they return ``False`` (never raise) on any malformed proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def mth(leaves: Sequence[bytes]) -> bytes:
    """MTH straight from the recursive definition (leaf hashes given). Reference for tests."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


class MerkleTree:
    """All levels of the tree over ``leaves`` (already leaf-hashed). ``levels[j][i]`` is the
    hash of leaves ``[i*2^j, min((i+1)*2^j, n))``: a node without a right sibling is carried up
    unchanged, which yields exactly the RFC's left-balanced tree."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        level = list(leaves)
        self.size = len(level)
        self.levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            self.levels.append(nxt)
            level = nxt

    def root(self) -> bytes:
        return self.levels[-1][0] if self.size else EMPTY_ROOT

    def _node(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi): a stored node when the range is one, else recomputed."""
        size = hi - lo
        j = (size - 1).bit_length()
        if lo % (1 << j) == 0 and (hi == lo + (1 << j) or hi == self.size):
            return self.levels[j][lo >> j]
        if size == 1:
            return self.levels[0][lo]
        k = _split(size)
        return node_hash(self._node(lo, lo + k), self._node(lo + k, hi))

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[0:size]) from the leaf upwards."""
        if not 0 <= index < self.size:
            raise ValueError("leaf index outside the tree")
        path: list[bytes] = []
        i = index
        for level in self.levels[:-1]:
            sibling = i ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            i >>= 1
        return path

    def consistency_proof(self, first: int) -> list[bytes]:
        """PROOF(first, D[0:size]): shows the tree of ``first`` leaves is a prefix of this one."""
        if not 0 <= first <= self.size:
            raise ValueError("first size outside the tree")
        if first in (0, self.size):
            return []
        return self._subproof(first, 0, self.size, True)

    def _subproof(self, m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [self._node(lo, hi)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, complete), self._node(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self._node(lo, lo + k)]


def _lsb(x: int) -> int:
    return x & 1


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes],
                     root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: is ``leaf`` (a leaf hash) the ``index``-th leaf of the tree of
    ``size`` leaves whose root is ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if len(p) != 32 or sn == 0:
            return False
        if _lsb(fn) or fn == sn:
            r = node_hash(p, r)
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: does the tree of ``second`` leaves extend the one of ``first``?"""
    if not 0 <= first <= second:
        return False
    if first == 0:
        return not path and (first_root == EMPTY_ROOT)
    if first == second:
        return not path and first_root == second_root
    if not path or any(len(p) != 32 for p in path):
        return False
    proof = list(path)
    if first & (first - 1) == 0:  # an exact power of two
        proof.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if _lsb(fn) or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
