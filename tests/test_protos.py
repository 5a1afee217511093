"""The committed generated code is exactly what the pinned generator produces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["takedown_pb2.py", "takedown_pb2.pyi", "takedown_pb2_grpc.py", "takedown_pb2_grpc.pyi"]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """Regenerating from protos/ with the pinned tools yields byte-identical files."""
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "protogen.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos" / "takedown" / "v1" / name).read_bytes()
        committed = (ROOT / "protos" / "takedown" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run scripts/protogen.sh and commit"
