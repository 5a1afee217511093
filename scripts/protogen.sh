#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code from protos/**/*.proto.
# The generator versions are pinned in pyproject.toml ([project.optional-dependencies] dev).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
py="${PYTHON:-python}"
# protoc finds the mypy plugins (protoc-gen-mypy*) next to the interpreter.
PATH="$(dirname "$(command -v "$py")"):$PATH"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/takedown/v1/takedown.proto
