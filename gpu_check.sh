#!/usr/bin/env bash
# The GPU check (about five minutes on one GPU): ./gpu_check.sh [--device cuda] [--data-dir data]
# (--help lists the flags). CIFAR_SYSTEM_PYTHON=1 uses the Python already there (no venv).
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
exec "$PYTHON" "$REPO_ROOT/src/gpu_check.py" "$@"
