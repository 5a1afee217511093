"""C2SP signed notes and checkpoints: the Go reference example, round trips and tampering."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.evidence.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from collector.evidence.errors import MalformedKey, MalformedNote, SignatureError
from collector.evidence.merkle import EMPTY_ROOT, leaf_hash
from collector.evidence.note import NoteSigner, NoteVerifier, key_id, open_note, sign_note

# golang.org/x/mod/sumdb/note's published example key and note.
VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
SIGNED = (
    TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAc"
    "ElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
SUMDB = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"


class TestKeys:
    def test_reference_keys(self) -> None:
        """The reference key strings parse, print back unchanged and belong together."""
        verifier = NoteVerifier.parse(VKEY)
        signer = NoteSigner.parse(SKEY)
        assert str(verifier) == VKEY
        assert str(signer) == SKEY
        assert signer.verifier() == verifier
        assert verifier.key_id == bytes.fromhex("c74f20a3")
        assert str(NoteVerifier.parse(SUMDB)) == SUMDB

    def test_key_id_is_name_newline_type_key(self) -> None:
        """The key ID is SHA-256(name || 0x0A || 0x01 || key)[:4], so it binds the name."""
        public = NoteVerifier.parse(VKEY).public_key
        assert key_id("PeterNeumann", public).hex() == "c74f20a3"
        assert key_id("PeterNeumann2", public).hex() != "c74f20a3"

    def test_mangled_keys_are_refused(self) -> None:
        """Every proper substring of the key, and every one-character change, is refused."""
        for i in range(len(VKEY)):
            for j in range(i + 1, len(VKEY) + 1):
                if (i, j) != (0, len(VKEY)):
                    with pytest.raises(MalformedKey):
                        NoteVerifier.parse(VKEY[i:j])
        for i in range(len(VKEY)):
            with pytest.raises(MalformedKey):
                NoteVerifier.parse(VKEY[:i] + chr(ord(VKEY[i]) + 1) + VKEY[i + 1 :])

    @pytest.mark.parametrize("name", ["", "has space", "plus+sign", "tab\tname"])
    def test_bad_names(self, name: str) -> None:
        """A key name must be non-empty, without spaces or '+'."""
        with pytest.raises(MalformedKey):
            NoteSigner.generate(name)

    def test_signer_repr_hides_the_seed(self) -> None:
        """A signer printed in a log line or traceback does not show its private key."""
        signer = NoteSigner.parse(SKEY)
        assert base64.b64encode(signer.seed).decode()[:10] not in repr(signer)


class TestNotes:
    def test_reference_signature_byte_for_byte(self) -> None:
        """Ed25519 is deterministic: signing the reference text reproduces the reference note."""
        assert sign_note(TEXT, NoteSigner.parse(SKEY)) == SIGNED
        text, good = open_note(SIGNED, NoteVerifier.parse(VKEY))
        assert text == TEXT
        assert good == [NoteVerifier.parse(VKEY)]

    @given(st.text(st.characters(min_codepoint=0x20, blacklist_categories=("Cs",))).map(
        lambda s: s + "\n"
    ))  # fmt: skip
    def test_round_trip(self, text: str) -> None:
        """Any text that may be a note opens to itself under the key that signed it."""
        signer = NoteSigner.parse(SKEY)
        assert open_note(sign_note(text, signer), signer.verifier())[0] == text

    def test_wrong_key(self) -> None:
        """A note signed by another key under the same name is not accepted."""
        other = NoteSigner.generate("PeterNeumann")
        with pytest.raises(SignatureError, match="no signature by a known key"):
            open_note(sign_note(TEXT, other), NoteVerifier.parse(VKEY))

    def test_altered_body(self) -> None:
        """Changing one letter of the text makes the known key's signature fail."""
        with pytest.raises(SignatureError, match="does not verify"):
            open_note(SIGNED.replace("cryptography", "cryptographY"), NoteVerifier.parse(VKEY))

    def test_altered_signature(self) -> None:
        """Changing one byte of the signature (not the key ID) fails verification."""
        text, _, line = SIGNED.rpartition("\n\u2014 PeterNeumann ")
        raw = bytearray(base64.b64decode(line))
        raw[10] ^= 1
        tampered = f"{text}\n\u2014 PeterNeumann {base64.b64encode(bytes(raw)).decode()}\n"
        with pytest.raises(SignatureError, match="does not verify"):
            open_note(tampered, NoteVerifier.parse(VKEY))

    def test_unknown_keys_are_ignored(self) -> None:
        """A signature by an unknown key is skipped; with no known one the note is refused."""
        stranger = NoteSigner.generate("stranger.example")
        both = sign_note(TEXT, stranger, NoteSigner.parse(SKEY))
        assert open_note(both, NoteVerifier.parse(VKEY))[1] == [NoteVerifier.parse(VKEY)]
        with pytest.raises(SignatureError, match=r"signed by: stranger\.example"):
            open_note(sign_note(TEXT, stranger), NoteVerifier.parse(VKEY))

    @pytest.mark.parametrize(
        "note",
        [
            TEXT,
            TEXT + "\n",
            TEXT + "\nPeterNeumann AAAA\n",
            TEXT + "\n\u2014 PeterNeumann !!!!\n",
            TEXT + "\n\u2014 PeterNeumann AAAA\n",
            "no newline",
            "bell\x07\n\n\u2014 PeterNeumann AAAAAAAA\n",
        ],
    )
    def test_malformed(self, note: str) -> None:
        """Notes without signature lines, with bad lines or control characters are refused."""
        with pytest.raises(MalformedNote):
            open_note(note, NoteVerifier.parse(VKEY))


class TestCheckpoints:
    LOG = NoteSigner.generate("takedown.example/log")

    def test_format(self) -> None:
        """The text is origin, decimal size and base64 root, each on its own line."""
        cp = Checkpoint("takedown.example/log", 0, EMPTY_ROOT)
        assert (
            cp.text() == "takedown.example/log\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
        )

    def test_round_trip(self) -> None:
        """A signed checkpoint opens to the same origin, size, root and extension lines."""
        cp = Checkpoint("takedown.example/log", 20852163, leaf_hash(b"x"), ("ext one",))
        assert open_checkpoint(sign_checkpoint(cp, self.LOG), self.LOG.verifier()) == cp

    @pytest.mark.parametrize(
        ("old", "new"), [("\n20852163\n", "\n20852164\n"), ("takedown.example/log\n2", "x\n2")]
    )
    def test_altered(self, old: str, new: str) -> None:
        """A changed size or origin no longer carries the log's signature."""
        cp = Checkpoint("takedown.example/log", 20852163, leaf_hash(b"x"))
        note = sign_checkpoint(cp, self.LOG)
        with pytest.raises(SignatureError):
            open_checkpoint(note.replace(old, new, 1), self.LOG.verifier())

    def test_wrong_key(self) -> None:
        """A checkpoint signed by another key, even under the log's name, is refused."""
        cp = Checkpoint("takedown.example/log", 3, leaf_hash(b"x"))
        forger = NoteSigner.generate("takedown.example/log")
        with pytest.raises(SignatureError):
            open_checkpoint(sign_checkpoint(cp, forger), self.LOG.verifier())

    def test_signer_must_be_the_origin(self) -> None:
        """The log's key only signs checkpoints of its own origin."""
        with pytest.raises(ValueError, match="does not sign"):
            sign_checkpoint(Checkpoint("other.example", 1, EMPTY_ROOT), self.LOG)

    @pytest.mark.parametrize(
        "text", ["o\n01\nAAAA\n", "o\n-1\nAAAA\n", "o\n1\n", "o\n1\nnot base64!\n", "o\n1\nAAAA\n"]
    )
    def test_malformed(self, text: str) -> None:
        """Leading zeros, a missing root, bad base64 or a short root are refused."""
        with pytest.raises(MalformedNote):
            Checkpoint.parse(text)
