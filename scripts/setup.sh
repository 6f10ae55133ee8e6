#!/usr/bin/env bash
# Install dept and its tooling into the current Python (fresh machine: Python 3.11, pip, gcc).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: this resolves to the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
