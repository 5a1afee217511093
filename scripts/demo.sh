#!/usr/bin/env bash
# Sets up the environment, then runs a collector, two agents and a sample hoster on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m demo.run "$@"
