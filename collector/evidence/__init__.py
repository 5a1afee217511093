"""Evidence a third party can verify offline: an RFC 6962 log of content-free leaves.

Every stored observation, notice and verdict event becomes a canonical leaf
(`leaves.py`); the leaves are appended to a Merkle tree (`log.py`, hashing and
proofs in `merkle.py`); the tree's head is published as a signed checkpoint
(`checkpoint.py`, a C2SP signed note made by `note.py`). A bundle (`bundle.py`)
holds the leaves about some URLs with inclusion proofs against one checkpoint,
and `verify.py` checks it with no database. docs/EVIDENCE.md specifies it all.

Everything here is pure (bytes and values in, bytes and values out) except the
few functions that read or write a bundle directory or a key file, which say so.

Errors, all from `collector.evidence.errors`::

    EvidenceError                 anything this package refuses
    ├── MalformedError            bytes that do not parse as what they claim to be
    │   ├── MalformedNote         a signed note or checkpoint
    │   ├── MalformedKey          a verifier or signer key string, or a key file
    │   ├── MalformedLeaf         a leaf that is not canonical or lacks a field
    │   └── MalformedBundle       a bundle directory missing a file or with bad JSON
    ├── ProofError                an inclusion or consistency proof that does not verify
    ├── SignatureError            a note with no verifying signature by a known key
    └── KeyFileError              a key file that cannot be made or read as asked
"""
