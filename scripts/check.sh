#!/usr/bin/env bash
# The project's one test command: lint, types, dependency direction, proto drift, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy dept_comm dept_model server worker benchmarks
echo "== import-linter"; lint-imports
echo "== pytest"; python -m pytest -q -p no:cacheprovider "$@"
