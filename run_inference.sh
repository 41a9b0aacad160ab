#!/usr/bin/env bash
# Predict: ./run_inference.sh [--weights PATH] [--data-dir DIR] [--device D] [--json] [IMAGE ...]
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
exec "$PYTHON" "$REPO_ROOT/src/inference.py" "$@"
