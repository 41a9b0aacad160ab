#!/usr/bin/env bash
# Tests: ./test.sh [pytest flags]. Needs no dataset: tests write synthetic CIFAR files.
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
cd "$REPO_ROOT" && exec "$PYTHON" -m pytest "$@"
