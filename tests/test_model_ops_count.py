"""The fast training step issues at most a third of the reference's device operations (DESIGN.md §6).

A count, not a timing: ATen compute ops + Triton launches of forward + backward, through the Triton
interpreter (the path CUDA tensors take), at a small MELD-like config (benchmarks/model_ops.py).
A launch-bound GPU step pays per operation, so a rise here is a slowdown there."""
import pytest

import mcncl_fast
from mcncl_fast import reference
from benchmarks.model_ops import CONFIG, count_training_step, table
from tests.helpers import INTERPRET


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels are counted through the interpreter")
@pytest.mark.parametrize("kv_source", ["input", "layer"])
def test_fast_step_issues_at_most_a_third_of_the_reference_ops(kv_source):
    config = dict(CONFIG, kv_source=kv_source)
    ref = count_training_step(reference.Model, config)
    fast = count_training_step(mcncl_fast.Model, config)
    report = table({"reference": ref, "fast": fast})
    assert fast.syncs == [], fast.syncs
    assert 3 * fast.total <= ref.total, report
