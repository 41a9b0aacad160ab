#!/usr/bin/env bash
# Tests: ./test.sh [pytest flags]. Needs no dataset: tests write synthetic CIFAR files.
#
# Two pytest workers (pytest-xdist), each taking a whole test file at a time (a module's shared
# runs are made once; the session's, once per worker) and running torch on one thread: the
# two cores stay busy through the tests' process starts and imports. On 2 cores that took
# 144-153 s against 194 s for one process of two threads; two threads per worker
# oversubscribed the cores (10 min). Flags of your own for workers (-n, --numprocesses,
# -p no:xdist) or --pdb run the tests as you ask, with torch's own thread count; so does a
# Python without pytest-xdist (CIFAR_SYSTEM_PYTHON=1, say).
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
workers=2
for flag in "$@"; do
    case "$flag" in -n*|--numprocesses*|--pdb|no:xdist) workers=0 ;; esac
done
if [ "$workers" = 2 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    export OMP_NUM_THREADS=1
    set -- -n 2 --dist loadfile "$@"
fi
cd "$REPO_ROOT" && exec "$PYTHON" -m pytest "$@"
