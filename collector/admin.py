"""`takedown-collector agents | intake-tokens | ca`: credentials and certificates.

`agents add NAME` prints the new token on stdout and nothing else there, so it
can go straight into a file (`> ams-1.token`); what it means goes to stderr.
The token is shown this once: the database keeps only its SHA-256 digest.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import TextIO

import configargparse
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.credentials import CredentialError
from collector.pki import PKIError, init_ca, issue
from collector.store.credentials import (
    CredentialConflict,
    add_credential,
    agent_keys,
    connect_credentials,
    list_credentials,
    pin_agent_key,
    revoke_credentials,
)
from collector.store.sql import label
from collector.tokens import Role, new_token

MAX_NAME = 128  # as the collector checks an agent's hello


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_name(name: str | None, what: str) -> str:
    if not name:
        raise configargparse.ArgumentTypeError(f"give the {what}'s NAME")
    if len(name) > MAX_NAME or not name.isprintable() or name != name.strip():
        raise configargparse.ArgumentTypeError(
            f"{name!r}: a name is 1-{MAX_NAME} printable characters without surrounding spaces"
        )
    return name


def credentials_command(
    args: configargparse.Namespace,
    role: Role,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    what = "agent" if role is Role.AGENT else "hotline"
    try:
        name = _check_name(args.name, what) if args.action != "list" else None
    except configargparse.ArgumentTypeError as exc:
        print(f"{args.action}: {exc}", file=err)
        return 2
    conn = connect_credentials(args.db)
    try:
        now = time.time()
        if args.action == "add":
            assert name is not None
            network = getattr(args, "network", None) or None
            key_file = getattr(args, "public_key", None)
            if key_file is not None:
                pin_agent_key(conn, name, read_public_key(key_file), now, replace=args.replace)
                print(f"{what} {name!r}: public key from {key_file} pinned", file=err)
            made = new_token()
            try:
                add_credential(
                    conn, role.value, name, network, made.token_id, made.digest, now,
                    replace=args.replace,
                )  # fmt: skip
            except CredentialConflict as exc:
                print(f"add: {exc}", file=err)
                return 1
            print(made.token, file=out)
            use = (
                "--token-file of takedown-agent" if role is Role.AGENT else "--token-file of import"
            )
            print(
                f"{what} {name!r}: token id {made.token_id} created in {label(args.db)}. It is"
                f" shown only this once (the database keeps a hash): store it in a file readable"
                f" only by the {what} (chmod 600) and give it as {use}.",
                file=err,
            )
            return 0
        if args.action == "revoke":
            assert name is not None
            count = revoke_credentials(conn, role.value, name, now)
            if not count:
                print(f"revoke: no live token for {what} {name!r} in {label(args.db)}", file=err)
                return 1
            print(
                f"{what} {name!r}: {count} token(s) revoked; open streams end within the"
                " collector's revalidation interval (30 s)",
                file=err,
            )
            return 0
        rows = list_credentials(conn, role.value)
        header = ["name", "token_id", "created", "revoked"]
        keys = agent_keys(conn) if role is Role.AGENT else {}
        if role is Role.AGENT:
            header[1:1] = ["network"]
            header += ["last_seen", "public_key"]
        print("\t".join(header), file=out)
        for c in rows:
            fields = [c.name, c.token_id, _when(c.created_at), _when(c.revoked_at)]
            if role is Role.AGENT:
                fields[1:1] = [c.network or "*"]
                key = keys.get(c.name)
                fields += [_when(c.last_seen), f"ed25519:{key.hex()}" if key else "-"]
            print("\t".join(fields), file=out)
        return 0
    finally:
        conn.close()


def read_public_key(path: Path) -> bytes:
    """The raw 32 bytes of an Ed25519 public key in a PEM file (the agent's agent.pub)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise CredentialError(f"cannot read the public key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise CredentialError(f"{path} is not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise CredentialError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ca_command(args: configargparse.Namespace, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    if args.action == "init":
        made = init_ca(args.dir, args.common_name, days=args.days or 3650)
        print(
            f"CA created: {made.cert} (give it to agents and hotlines as --ca-file, and to"
            f" serve as --client-ca-file for mutual TLS); key {made.key} (0600: keep it"
            " offline if you can)",
            file=err,
        )
        return 0
    if not args.name:
        raise PKIError("issue needs --name")
    made = issue(
        args.dir, args.name, server=args.server, dns=args.dns, ips=args.ip, days=args.days or 825
    )
    kind = "collector" if args.server else f"agent {args.name!r}"
    print(f"certificate for {kind}: {made.cert}, key {made.key} (0600)", file=err)
    return 0
