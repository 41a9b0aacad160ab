# Sourced by run.sh, run_inference.sh, test.sh and setup_intel.sh: make .venv if missing,
# (re)install the requirements when they changed since the last install, and activate it.
# REQUIREMENTS picks the file (setup_intel.sh sets requirements.intel.txt). The caller's
# working directory is left alone, so relative paths in flags mean what the user meant.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
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
