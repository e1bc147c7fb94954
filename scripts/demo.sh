#!/usr/bin/env bash
# Set up the venv if needed, then run the demo search campaign (offline, local Ray, 2 CPU cores).
# Results land in ./mlflow.db, ./optuna.db and ./ray_results/demo; a second run resumes/shows it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f ray_results/demo/campaign.yaml ]; then
  echo "campaign 'demo' exists: resuming it (delete ray_results/demo, mlflow.db and optuna.db to start over)"
  .venv/bin/oscqat search resume demo "$@"
else
  .venv/bin/oscqat search run campaigns/demo.yaml "$@"
fi
