"""RFC 6962 hashing and proofs: reference vectors, corruptions, and the log held to them."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.evidence.errors import ProofError
from collector.evidence.log import MemoryNodes, MerkleLog
from collector.evidence.merkle import (
    EMPTY_ROOT,
    consistency_path,
    inclusion_path,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency reference vectors (as kept in transparency-dev/merkle's
# proof/verify_test.go and rfc6962/rfc6962_test.go): eight leaves, the root of each prefix,
# and some inclusion and consistency proofs.
LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]  # fmt: skip
ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]  # fmt: skip


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# (leaf index, tree size, path); the reference lists leaves 1-based, these are 0-based.
INCLUSION = [
    (0, 1, []),
    (0, 8, [
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ]),
    (5, 8, [
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (1, 5, [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
    ]),
]  # fmt: skip

CONSISTENCY = [
    (1, 1, []),
    (1, 8, [
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ]),
    (6, 8, [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]),
    (2, 5, [
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
    ]),
    (6, 7, [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]),
]  # fmt: skip

HASHES = [leaf_hash(d) for d in LEAVES]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def flipped(proof: list[bytes], i: int, bit: int) -> list[bytes]:
    out = list(proof)
    out[i] = bytes([out[i][0] ^ bit]) + out[i][1:]
    return out


class TestHashing:
    def test_empty_tree(self) -> None:
        """The empty tree's root is SHA-256 of nothing, not the hash of an empty leaf."""
        assert EMPTY_ROOT.hex() == (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        )
        assert root_of([]) == EMPTY_ROOT
        assert leaf_hash(b"").hex() == (
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        )

    def test_leaf_and_node(self) -> None:
        """A leaf is SHA-256(0x00 || data), a node SHA-256(0x01 || left || right)."""
        assert leaf_hash(b"L123456").hex() == (
            "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
        )
        assert node_hash(b"N123", b"N456").hex() == (
            "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
        )

    @pytest.mark.parametrize("n", range(1, 9))
    def test_roots_of_prefixes(self, n: int) -> None:
        """The root of the first n reference leaves is the reference root, both ways."""
        assert root_of(HASHES[:n]) == ROOTS[n - 1]
        assert MerkleLog.of(HASHES[:n]).root() == ROOTS[n - 1]
        assert MerkleLog.of(HASHES).root(n) == ROOTS[n - 1]


class TestInclusion:
    @pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
    def test_reference_paths(self, index: int, size: int, path: list[bytes]) -> None:
        """Both the recursion and the log produce the reference path, and it verifies."""
        assert inclusion_path(index, HASHES[:size]) == path
        assert MerkleLog.of(HASHES).inclusion_proof(index, size) == path
        verify_inclusion(index, size, HASHES[index], path, ROOTS[size - 1])

    @pytest.mark.parametrize(("index", "size", "path"), INCLUSION[1:])
    def test_corruptions_fail(self, index: int, size: int, path: list[bytes]) -> None:
        """A wrong index, size, leaf, root, or a padded, cut or bit-flipped path is refused."""
        root, leaf = ROOTS[size - 1], HASHES[index]
        bad = [
            (index - 1, size, leaf, path, root),
            (index + 1, size, leaf, path, root),
            (index ^ 2, size, leaf, path, root),
            (index, size * 2, leaf, path, root),
            (index, size // 2, leaf, path, root),
            (index, size, leaf_hash(b"WrongLeaf"), path, root),
            (index, size, leaf, path, EMPTY_ROOT),
            (index, size, leaf, path, SOME_HASH),
            (index, size, leaf, [*path, b""], root),
            (index, size, leaf, [*path, root], root),
            (index, size, leaf, [b"", *path], root),
            (index, size, leaf, [root, *path], root),
            (index, size, leaf, path[:-1], root),
            (index, size, leaf, [path[0], SOME_HASH, *path[1:]], root),
        ] + [(index, size, leaf, flipped(path, i, 8), root) for i in range(len(path))]
        for args in bad:
            with pytest.raises(ProofError):
                verify_inclusion(*args)

    def test_single_leaf(self) -> None:
        """In a tree of one the leaf hash is the root and the path is empty."""
        one = leaf_hash(b"data")
        verify_inclusion(0, 1, one, [], one)
        for leaf, root in ((one, b""), (b"", one), (b"", b"")):
            with pytest.raises(ProofError):
                verify_inclusion(0, 1, leaf, [], root)

    @pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (2, 1)])
    def test_leaf_outside_tree(self, index: int, size: int) -> None:
        """A leaf index at or past the tree size never verifies."""
        with pytest.raises(ProofError, match="outside"):
            verify_inclusion(index, size, SOME_HASH, [], EMPTY_ROOT)


class TestConsistency:
    @pytest.mark.parametrize(("old", "new", "path"), CONSISTENCY)
    def test_reference_paths(self, old: int, new: int, path: list[bytes]) -> None:
        """Both the recursion and the log produce the reference proof, and it verifies."""
        assert consistency_path(old, HASHES[:new]) == path
        assert MerkleLog.of(HASHES).consistency_proof(old, new) == path
        verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], path)

    @pytest.mark.parametrize(("old", "new", "path"), [c for c in CONSISTENCY if c[2]])
    def test_corruptions_fail(self, old: int, new: int, path: list[bytes]) -> None:
        """Wrong sizes or roots, swapped roots, or a padded, cut or bit-flipped proof fail."""
        r1, r2 = ROOTS[old - 1], ROOTS[new - 1]
        bad = [
            (old - 1, new, r1, r2, path),
            (old + 1, new, r1, r2, path),
            (old ^ 2, new, r1, r2, path),
            (old, new * 2, r1, r2, path),
            (old, new // 2, r1, r2, path),
            (old, new, b"WrongRoot", r2, path),
            (old, new, r1, b"WrongRoot", path),
            (old, new, r2, r1, path),
            (old, new, r1, r2, []),
            (old, new, r1, r2, [*path, b""]),
            (old, new, r1, r2, [*path, r1]),
            (old, new, r1, r2, [*path, r2]),
            (old, new, r1, r2, [b"", *path]),
            (old, new, r1, r2, [r1, *path]),
            (old, new, r1, r2, [r2, *path]),
            (old, new, r1, r2, [path[0], *path]),
            (old, new, r1, r2, path[:-1]),
        ] + [(old, new, r1, r2, flipped(path, i, 16)) for i in range(len(path))]
        for args in bad:
            with pytest.raises(ProofError):
                verify_consistency(*args)

    def test_trivial_sizes(self) -> None:
        """Equal sizes need equal roots and no proof; from the empty tree, no proof."""
        a, b = b"don't care 1", b"don't care 2"
        verify_consistency(0, 0, a, a, [])
        verify_consistency(0, 1, a, b, [])
        verify_consistency(1, 1, b, b, [])
        for args in [
            (0, 0, a, b, []),
            (1, 1, a, b, []),
            (1, 0, a, b, []),
            (2, 1, a, b, []),
            (1, 2, a, b, []),
            (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
            (0, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
            (1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
        ]:
            with pytest.raises(ProofError):
                verify_consistency(*args)


def digests(n: int) -> list[bytes]:
    return [leaf_hash(hashlib.sha256(i.to_bytes(8, "big")).digest()) for i in range(n)]


class TestMerkleLog:
    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
    def test_inclusion_matches_reference(self, case: tuple[int, int]) -> None:
        """For any size and leaf the log's path equals the RFC recursion's and verifies."""
        n, index = case
        hashes = digests(n)
        log = MerkleLog.of(hashes)
        path = log.inclusion_proof(index)
        assert path == inclusion_path(index, hashes)
        verify_inclusion(index, n, hashes[index], path, root_of(hashes))

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
    def test_consistency_matches_reference(self, case: tuple[int, int]) -> None:
        """For any two sizes the log's proof equals the RFC recursion's and verifies."""
        n, old = case
        hashes = digests(n)
        log = MerkleLog.of(hashes)
        proof = log.consistency_proof(old)
        assert proof == consistency_path(old, hashes)
        verify_consistency(old, n, log.root(old), log.root(), proof)
        assert log.root(old) == root_of(hashes[:old])

    def test_resume_from_stored_nodes(self) -> None:
        """A log reopened over its stored nodes has the same root and keeps growing the same."""
        hashes = digests(37)
        nodes = MemoryNodes()
        first = MerkleLog(nodes)
        for d in hashes[:29]:
            first.append(d)
        again = MerkleLog(nodes, size=29)
        assert again.root() == root_of(hashes[:29])
        for d in hashes[29:]:
            again.append(d)
        assert again.root() == root_of(hashes)
        assert again.inclusion_proof(3) == inclusion_path(3, hashes)

    def test_append_writes_few_nodes(self) -> None:
        """Each append stores its leaf and at most log2(n) parents, about two nodes a leaf."""
        writes: list[tuple[int, int]] = []

        class Counting(MemoryNodes):
            def put(self, height: int, index: int, digest: bytes) -> None:
                writes.append((height, index))
                super().put(height, index, digest)

        log = MerkleLog(Counting())
        for d in digests(1024):
            log.append(d)
        assert len(writes) == 2047
        assert max(hh for hh, _ in writes) == 10

    def test_refuses_sizes_it_never_had(self) -> None:
        """Asking for a size beyond the log, or a leaf outside it, is an error, not a guess."""
        log = MerkleLog.of(digests(5))
        with pytest.raises(ValueError, match="size 6"):
            log.root(6)
        with pytest.raises(ValueError, match="leaf 5"):
            log.inclusion_proof(5)
        with pytest.raises(ValueError, match="32 bytes"):
            log.append(b"short")
