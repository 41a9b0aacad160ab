#!/usr/bin/env bash
# Train: ./run.sh [train.py flags], e.g. ./run.sh --epochs 25 --data-dir data
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
exec "$PYTHON" "$REPO_ROOT/src/train.py" "$@"
