"""Package boundaries: the collector never needs the agent; protos/ holds generated code only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class TestLayout:
    def test_collector_does_not_import_the_agent(self) -> None:
        """Importing every collector module loads no module of the agent package."""
        modules = sorted(
            ".".join(p.relative_to(ROOT).with_suffix("").parts)
            for p in (ROOT / "collector").rglob("*.py")
            if p.name != "__main__.py"
        )
        code = (
            "import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'agent' or m.startswith('agent.')))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
        )
        assert done.stdout.strip() == "[]", done.stdout

    def test_protos_holds_only_generated_code(self) -> None:
        """Every Python file under protos/ is generator output or an empty package marker."""
        hand_written = [
            str(p.relative_to(ROOT))
            for p in (ROOT / "protos").rglob("*.py*")
            if not p.name.endswith(GENERATED_SUFFIXES)
            and not (p.name == "__init__.py" and not p.read_text().strip())
        ]
        assert hand_written == []
