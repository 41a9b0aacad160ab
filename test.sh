#!/usr/bin/env bash
# Tests: ./test.sh [pytest flags]. Needs no dataset: tests write synthetic CIFAR files.
#
# Two pytest workers (pytest-xdist), each taking a whole test file at a time (the module-wide
# runs some files share are made once) and running torch on one thread: the two cores stay
# busy through the tests' process starts and imports. On 2 cores that took 144 s against 194 s
# for one process of two threads; two threads per worker oversubscribed the cores (10 min).
# Without pytest-xdist (CIFAR_SYSTEM_PYTHON=1, say) the tests run in one process.
set -u
source "$(dirname "$0")/ensure_venv.sh" || exit 1
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    export OMP_NUM_THREADS=1
    set -- -n 2 --dist loadfile "$@"
fi
cd "$REPO_ROOT" && exec "$PYTHON" -m pytest "$@"
