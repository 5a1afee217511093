"""The collector's log key: the one Ed25519 key that signs checkpoints.

`takedown-collector log-key init DIR --origin NAME` makes `DIR/log.key` (the
signer key string, mode 0600) and `DIR/log.vkey` (the verifier key string to
publish and to give regulators). It is separate from the TLS keys on purpose:
it outlives certificates, and a leaked TLS key must not be able to sign what
the log has seen. Existing files are never overwritten.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from collector.evidence.errors import KeyFileError
from collector.evidence.note import NoteSigner, NoteVerifier

SIGNER_FILE = "log.key"
VERIFIER_FILE = "log.vkey"


def _write_new(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} exists; not overwriting it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def init_log_key(directory: Path, origin: str) -> tuple[Path, NoteVerifier]:
    """Make a new log key named `origin` in `directory`; the signer file and the verifier."""
    signer = NoteSigner.generate(origin)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = directory / SIGNER_FILE, directory / VERIFIER_FILE
    if public.exists():
        raise KeyFileError(f"{public} exists; not overwriting it")
    _write_new(private, f"{signer}\n", 0o600)
    _write_new(public, f"{signer.verifier()}\n", 0o644)
    return private, signer.verifier()


def load_log_key(path: Path) -> NoteSigner:
    """The log's signer key from `path`; refused if group or others may read it."""
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"the log key {path} is readable by others; chmod 600 it")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        if isinstance(exc, KeyFileError):
            raise
        raise KeyFileError(f"cannot read the log key {path}: {exc.strerror}") from exc
    return NoteSigner.parse(text)


def read_verifier(text_or_path: str) -> NoteVerifier:
    """A verifier key given as the key string itself or as a file holding it."""
    if "+" in text_or_path and not Path(text_or_path).exists():
        return NoteVerifier.parse(text_or_path)
    try:
        return NoteVerifier.parse(Path(text_or_path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyFileError(f"cannot read the log key {text_or_path}: {exc.strerror}") from exc
