#!/usr/bin/env bash
# Re-measure the README's results within a time budget: ./reproduce.sh [--budget S] [...]
# (--help lists the flags). CIFAR_SYSTEM_PYTHON=1 uses the Python already there (no venv).
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
exec "$PYTHON" "$REPO_ROOT/src/reproduce.py" "$@"
