#!/usr/bin/env bash
# Set up the venv if needed, then run the whole test suite. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff check . || { echo "ruff found problems (see above)"; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected
  echo "no tests were collected"; exit 0
fi
exit "$rc"
