# Sourced by run.sh, run_inference.sh, reproduce.sh, test.sh and setup_intel.sh: make .venv if
# missing, (re)install the requirements when they changed since the last install, activate it,
# and set PYTHON to its interpreter. REQUIREMENTS picks the file (setup_intel.sh sets
# requirements.intel.txt). The caller's working directory is left alone, so relative paths in
# flags mean what the user meant.
#
# CIFAR_SYSTEM_PYTHON=1: no venv and no pip; use the Python already there (PYTHON, default
# python3), which must have torch, torchvision, tqdm and tensorboard (a machine without
# internet, say).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "${CIFAR_SYSTEM_PYTHON:-0}" = 1 ]; then
    PYTHON="${PYTHON:-python3}"
    if ! "$PYTHON" -c "import torch, torchvision, tqdm, tensorboard" 2>/dev/null; then
        echo "error: CIFAR_SYSTEM_PYTHON=1, but $PYTHON cannot import torch, torchvision," \
             "tqdm and tensorboard; install them, or unset CIFAR_SYSTEM_PYTHON to use .venv" >&2
        return 1
    fi
    return 0
fi
_requirements="$REPO_ROOT/${REQUIREMENTS:-requirements.txt}"
if [ ! -x "$REPO_ROOT/.venv/bin/python" ]; then
    echo "creating $REPO_ROOT/.venv" >&2
    "${PYTHON:-python3}" -m venv "$REPO_ROOT/.venv" || return 1
fi
_stamp="$REPO_ROOT/.venv/.installed-$(basename "$_requirements")"
if ! cmp -s "$_requirements" "$_stamp"; then
    echo "installing $(basename "$_requirements") into .venv (once)" >&2
    "$REPO_ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$_requirements" || return 1
    cp "$_requirements" "$_stamp"
fi
unset _requirements _stamp
source "$REPO_ROOT/.venv/bin/activate"
PYTHON="$REPO_ROOT/.venv/bin/python"
