# Prepare an Intel GPU (XPU) machine. Source it, do not run it:  source ./setup_intel.sh
# Activates .venv (made if missing), sources oneAPI's setvars.sh where present, installs the
# XPU builds of torch/torchvision (requirements.intel.txt) when needed, and says whether
# torch.xpu sees a device. Afterwards ./run.sh in this shell keeps the XPU build.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "setup_intel.sh must be sourced: source ./setup_intel.sh" >&2
    exit 1
fi
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for _setvars in "${ONEAPI_ROOT:-/opt/intel/oneapi}/setvars.sh" "$HOME/intel/oneapi/setvars.sh"; do
    if [ -f "$_setvars" ]; then
        source "$_setvars" > /dev/null 2>&1 && echo "sourced $_setvars" >&2
        break
    fi
done
export REQUIREMENTS=requirements.intel.txt
source "$_here/ensure_venv.sh" || return 1
"$PYTHON" - <<'PY'
import torch
if hasattr(torch, "xpu") and torch.xpu.is_available():
    names = [torch.xpu.get_device_name(i) for i in range(torch.xpu.device_count())]
    print(f"torch {torch.__version__}: xpu available: {', '.join(names)}")
else:
    print(f"torch {torch.__version__}: no xpu device visible (driver installed? see README)")
try:
    import intel_extension_for_pytorch as ipex
    print(f"intel_extension_for_pytorch {ipex.__version__} found: ipex.optimize will be applied")
except ImportError:
    print("intel_extension_for_pytorch not installed: plain torch.xpu (IPEX is end-of-life)")
PY
unset _here _setvars
