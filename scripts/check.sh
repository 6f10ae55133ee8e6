#!/usr/bin/env bash
# The project's one test command: lint, types, dependency direction, proto drift, tests.
#   scripts/check.sh [--fast] [PYTEST_ARGS...]
# Everything by default (CI runs it so). --fast leaves out tests marked `slow` (real processes:
# end-to-end runs, the session's real run, kill sweeps) for the edit-test loop; other arguments
# go to pytest as they are, e.g. `scripts/check.sh --fast tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
pytest_args=()
for arg in "$@"; do
  if [[ "$arg" == "--fast" ]]; then
    pytest_args+=(-m "not slow")
  else
    pytest_args+=("$arg")
  fi
done
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy dept_comm dept_model server worker benchmarks experiment
echo "== import-linter"; lint-imports
echo "== pytest"; python -m pytest -q -p no:cacheprovider ${pytest_args[@]+"${pytest_args[@]}"}
