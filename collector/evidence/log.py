"""An append-only RFC 6962 tree that keeps only complete subtree hashes.

Theory of operation. Node (height h, index i) is the hash of the complete
subtree over leaves [i * 2^h, (i + 1) * 2^h). Appending leaf n makes node
(0, n) and then, while the new node is a right child, its parent: on average
one interior node per leaf, at most log2(n) of them. Those nodes never change
again, so a `NodeStore` can be an append-only table. The *frontier* is, for
each set bit h of the size, the hash of the complete subtree that bit stands
for; it is kept in memory, so an append reads nothing and the root of the
current tree costs O(log n) hashes.

Any subtree the RFC's recursion asks for is either complete (one stored
node) or the right edge [lo, hi) of a tree, which splits into O(log n)
complete ones; so the root of any earlier size, an inclusion proof or a
consistency proof costs O(log n) node reads and at most O(log^2 n) hashes.
The results equal `collector.evidence.merkle`'s reference recursion over the
leaf hashes (a property test holds them to it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from collector.evidence.merkle import EMPTY_ROOT, HASH_SIZE, node_hash, split_point


class NodeStore(Protocol):
    """Where complete subtree hashes live: memory here, a table in the collector's store."""

    def get(self, height: int, index: int) -> bytes:
        """The hash of node (height, index); it was put before."""
        ...

    def put(self, height: int, index: int, digest: bytes) -> None:
        """Keep the hash of a node that has just become complete (never put twice)."""
        ...


class MemoryNodes:
    """A NodeStore in memory: one bytearray per height, 32 bytes a node."""

    def __init__(self) -> None:
        self._levels: list[bytearray] = []

    def get(self, height: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[height][start : start + HASH_SIZE])

    def put(self, height: int, index: int, digest: bytes) -> None:
        while len(self._levels) <= height:
            self._levels.append(bytearray())
        level = self._levels[height]
        if len(level) != index * HASH_SIZE:
            raise ValueError(f"node ({height}, {index}) is not the next one at its height")
        level += digest


class MerkleLog:
    """The log's tree: append leaf hashes; roots and proofs for this or any earlier size."""

    def __init__(self, nodes: NodeStore | None = None, size: int = 0) -> None:
        """A log over `nodes` that already holds the complete subtrees of `size` leaves."""
        self.nodes: NodeStore = MemoryNodes() if nodes is None else nodes
        self._size = size
        self._frontier: dict[int, bytes] = {}
        start = 0
        for h in range(size.bit_length() - 1, -1, -1):
            if size >> h & 1:
                self._frontier[h] = self.nodes.get(h, start >> h)
                start += 1 << h

    @classmethod
    def of(cls, hashes: Iterable[bytes]) -> MerkleLog:
        """A log in memory holding these leaf hashes, in order."""
        log = cls()
        for digest in hashes:
            log.append(digest)
        return log

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> int:
        """Add one leaf hash (see `merkle.leaf_hash`); return its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(leaf)}")
        index = self._size
        self.nodes.put(0, index, leaf)
        carry, h, i = leaf, 0, index
        while i & 1:
            carry = node_hash(self._frontier.pop(h), carry)
            h, i = h + 1, i >> 1
            self.nodes.put(h, i, carry)
        self._frontier[h] = carry
        self._size = index + 1
        return index

    def root(self, size: int | None = None) -> bytes:
        """The root of the tree of `size` leaves (default: all of them)."""
        n = self._size if size is None else size
        self._check_size(n)
        if n == self._size:
            acc: bytes | None = None
            for h in sorted(self._frontier):
                acc = self._frontier[h] if acc is None else node_hash(self._frontier[h], acc)
            return EMPTY_ROOT if acc is None else acc
        return EMPTY_ROOT if n == 0 else self._hash(0, n)

    def leaf(self, index: int) -> bytes:
        """The leaf hash at `index`."""
        if not 0 <= index < self._size:
            raise ValueError(f"leaf {index} is not in a log of {self._size}")
        return self.nodes.get(0, index)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[size]) of RFC 6962: the hashes that lead leaf `index` to the root."""
        n = self._size if size is None else size
        self._check_size(n)
        if not 0 <= index < n:
            raise ValueError(f"leaf {index} is not in a tree of {n}")
        path: list[bytes] = []
        lo, hi = 0, n
        while hi - lo > 1:
            k = split_point(hi - lo)
            if index < lo + k:
                path.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._hash(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[size]) of RFC 6962: the tree of `old_size` is a prefix of `size`."""
        n = self._size if size is None else size
        self._check_size(n)
        if not 0 <= old_size <= n:
            raise ValueError(f"size {old_size} is not a prefix of a tree of {n}")
        if old_size in (0, n):
            return []
        path: list[bytes] = []
        lo, hi, m, complete = 0, n, old_size, True
        while m != hi - lo:
            k = split_point(hi - lo)
            if m <= k:
                path.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._hash(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        if not complete:
            path.append(self._hash(lo, hi))
        path.reverse()
        return path

    def _check_size(self, n: int) -> None:
        if not 0 <= n <= self._size:
            raise ValueError(f"size {n} is not one this log of {self._size} has had")

    def _hash(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for a subtree the recursion reaches (lo aligned to its left half)."""
        width = hi - lo
        if width & (width - 1) == 0:
            h = width.bit_length() - 1
            return self.nodes.get(h, lo >> h)
        k = split_point(width)
        return node_hash(self._hash(lo, lo + k), self._hash(lo + k, hi))
