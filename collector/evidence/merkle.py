"""RFC 6962 (and RFC 9162 section 2.1) Merkle tree hashing, proofs and their verification.

Theory of operation. A log of n leaves has the Merkle Tree Hash

    MTH({})      = SHA-256()
    MTH({d0})    = SHA-256(0x00 || d0)                          (a leaf hash)
    MTH(D[0:n])  = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  (a node hash)

where k is the largest power of two smaller than n. Every left subtree in that
recursion is complete (a power of two leaves, aligned), so a log that keeps the
hashes of complete subtrees can produce any root or proof with O(log n) of
them (`collector.evidence.log`). The functions here that take a list of leaf
hashes follow the RFC's recursive definitions literally: they are the
reference the efficient log is tested against, and they are what a bundle
writer may use on a small list.

The verifiers follow RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by step and
take no tree at all, only sizes, hashes and the proof: that is all a regulator
has. Every failure raises `ProofError` saying which check failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from collector.evidence.errors import ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """The RFC 6962 hash of one leaf: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(hashes: Sequence[bytes]) -> bytes:
    """MTH of the leaves whose leaf hashes are given (the reference recursion)."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = split_point(n)
    return node_hash(root_of(hashes[:k]), root_of(hashes[k:]))


def inclusion_path(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 6962 section 2.1.1, from the leaf up."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = split_point(n)
    if index < k:
        return [*inclusion_path(index, hashes[:k]), root_of(hashes[k:])]
    return [*inclusion_path(index - k, hashes[k:]), root_of(hashes[:k])]


def consistency_path(old_size: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, D[n]) of RFC 6962 section 2.1.2."""
    n = len(hashes)
    if not 0 <= old_size <= n:
        raise ValueError(f"size {old_size} is not a prefix of a tree of {n}")
    if old_size in (0, n):
        return []
    return _subproof(old_size, hashes, complete=True)


def _subproof(m: int, hashes: Sequence[bytes], *, complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [root_of(hashes)]
    k = split_point(n)
    if m <= k:
        return [*_subproof(m, hashes[:k], complete=complete), root_of(hashes[k:])]
    return [*_subproof(m - k, hashes[k:], complete=False), root_of(hashes[:k])]


def _check_hashes(what: str, values: Sequence[bytes]) -> None:
    for i, value in enumerate(values):
        if len(value) != HASH_SIZE:
            raise ProofError(f"{what}[{i}] is {len(value)} bytes, not a SHA-256 hash")


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` says a tree of `size` with `leaf` (a leaf hash) at `index` has."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hashes("leaf hash", [leaf])
    _check_hashes("proof", proof)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError(f"inclusion proof for leaf {index} of {size} is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion proof for leaf {index} of {size} is too short")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows `leaf` (a leaf hash) at `index` under `root`."""
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ProofError(
            f"inclusion proof for leaf {index} leads to another root than the tree of {size}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless `proof` shows the tree of `old_size` is a prefix of `new_size`."""
    if old_size < 0 or new_size < old_size:
        raise ProofError(f"a tree of {new_size} cannot extend one of {old_size}")
    _check_hashes("proof", proof)
    if old_size == new_size:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {old_size}")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError(f"empty consistency proof from {old_size} to {new_size}")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"consistency proof from {old_size} to {new_size} is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"consistency proof from {old_size} to {new_size} is too short")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the root of the tree of {old_size}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of the tree of {new_size}")
