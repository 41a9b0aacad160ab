"""A few trials of every fault of fault_injection.py, on demand (./test.sh -m slow: a few
minutes on 2 cores); the full set: python tests/fault_injection.py"""
import pytest

from fault_injection import inject, summary


@pytest.mark.slow
def test_every_fault_is_recovered_with_the_weights_of_an_uninterrupted_run(tmp_path):
    results = inject(tmp_path, kills=2, stops=1, seed=0, progress=False)
    faults = [r[0] for r in results]
    # The four deterministic trials always inject their fault, the kills during a write too.
    assert {"a checkpoint write failing (EFBIG)", "a truncated checkpoint",
            "--epochs changed on a resume", "a second run on a live run's folder"} <= set(faults)
    assert any(f.endswith("a checkpoint write") for f in faults), faults
    n = len(results)
    assert summary(results) == (f"{n} faults injected, {n} runs recovered, {n} with weights "
                                f"identical to an uninterrupted run, 0 checkpoints lost")
