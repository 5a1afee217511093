#!/usr/bin/env bash
# Creates .venv and installs the project with its development tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip &&
       .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]'; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: installing the project into .venv failed (output above)" >&2
  exit 1
fi
rm -f "$log"
