#!/usr/bin/env bash
# Set up the venv if needed, then run the demo (offline, local, 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/oscqat train configs/demo.yaml "$@"
