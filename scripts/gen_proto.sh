#!/usr/bin/env bash
# Regenerate dept_comm/pb from proto/ (run from anywhere; writes into the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/dept_comm/pb/tensor.proto proto/dept_comm/pb/service.proto
