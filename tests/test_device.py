"""Device picking. This machine has only a CPU, so CUDA, XPU and MPS availability is faked."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import SRC
from device import (KEEP_SWITCH, gnu_libc, ipex_problem, keep_freed_memory, optimize_for_device,
                    pick_device)


def fake_available(monkeypatch, cuda=False, xpu=False, mps=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("flags, expected", [
    (dict(cuda=True, xpu=True, mps=True), "cuda"),
    (dict(xpu=True, mps=True), "xpu"),
    (dict(mps=True), "mps"),
    (dict(), "cpu"),
])
def test_auto_prefers_cuda_then_xpu_then_mps_then_cpu(monkeypatch, capsys, flags, expected):
    fake_available(monkeypatch, **flags)
    monkeypatch.setattr("device.describe", lambda d: d.type)   # no real device to name
    assert pick_device("auto") == torch.device(expected)
    assert capsys.readouterr().err == f"device: {expected}\n"


def test_explicit_device_that_is_missing_is_one_clear_error(monkeypatch):
    fake_available(monkeypatch)
    for kind in ("cuda", "xpu", "mps"):
        with pytest.raises(ValueError, match=f"^device '{kind}' was asked for but is not "
                                             f"available here$"):
            pick_device(kind)
    assert pick_device("cpu", verbose=False) == torch.device("cpu")


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose from auto, cpu, cuda"):
        pick_device("tpu")


def test_optimize_is_a_no_op_off_xpu_and_without_ipex():
    model, opts = torch.nn.Linear(2, 2), []
    assert optimize_for_device(model, opts, torch.device("cpu")) == (model, opts, None)
    if ipex_problem() == "not installed":        # as on every machine this repo has met
        assert optimize_for_device(model, opts, torch.device("xpu")) == (model, opts, None)


def installed_ipex(folder, version):
    """An installed package's metadata for IPEX `version` (what `ipex_problem` reads; no
    module to import)."""
    dist = folder / f"intel_extension_for_pytorch-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel_extension_for_pytorch\n"
                                   f"Version: {version}\n")


@pytest.mark.parametrize("version, optimizers, why", [
    ("2.3.110+xpu", 1, "version 2.3.110+xpu is built for torch 2.3, this is torch {torch}"),
    ("{torch_minor}.10+xpu", 2, "it takes one optimiser, this run has 2")])
def test_ipex_that_cannot_serve_the_run_is_named_and_never_imported(version, optimizers, why,
                                                                   tmp_path, monkeypatch):
    """A build for another torch (importing one ends the process) is caught from its metadata;
    --optimizer muon's two optimisers would leave the second stepping a stale model."""
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    installed_ipex(tmp_path, version.format(torch_minor=torch_minor))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = torch.nn.Linear(2, 2)
    opts = [torch.optim.SGD(model.parameters(), lr=0.1) for _ in range(optimizers)]
    assert optimize_for_device(model, opts, torch.device("xpu")) == (
        model, opts, f"intel_extension_for_pytorch not used: "
                     f"{why.format(torch=torch.__version__)}")


FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
sys.path.insert(0, {src!r})
from device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(torch.device("cpu"))
def faults_of_a_fresh_64_mib_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20)          # 64 MiB of float32, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(10):                   # until the freed blocks have merged into ones that fit
    faults_of_a_fresh_64_mib_tensor()
print(sum(faults_of_a_fresh_64_mib_tensor() for _ in range(5)))
"""


def transparent_huge_pages():
    """The kernel's THP mode ("always", "madvise", "never"), or "" where it does not say."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif("glibc" not in gnu_libc(), reason="mallopt is glibc's")
@pytest.mark.skipif(transparent_huge_pages() == "always",
                    reason="with huge pages always on, a 64 MiB block faults only ~32 times")
def test_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    """A 64 MiB tensor made and freed again and again, as a training step does: glibc as it
    comes maps each afresh and faults in its 16,384 pages every time; after keep_freed_memory
    the freed blocks are reused (once they have merged into blocks that fit posix_memalign's
    request), faulting none."""
    script = FAULTS_OF_A_REUSED_BLOCK.format(src=SRC)
    env = {k: v for k, v in os.environ.items() if k != KEEP_SWITCH}
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], check=True,
                                       capture_output=True, text=True, env=env).stdout)
              for mode in ("as-it-comes", "keep")}
    assert faults["as-it-comes"] >= 5 * 16_000
    assert faults["keep"] < 100


def test_keep_freed_memory_changes_nothing_but_on_the_cpu(monkeypatch):
    assert not keep_freed_memory(torch.device("cuda"))
    monkeypatch.setenv(KEEP_SWITCH, "0")
    assert not keep_freed_memory(torch.device("cpu"))
