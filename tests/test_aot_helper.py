"""The AOT helper itself: compiles a real kernel and rejects one the GPU compiler refuses."""
import pytest
import triton
import triton.language as tl

from tests.aot import TARGETS, compile_for_targets, launch_hints


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, x * factor, mask=offs < n)


@triton.jit
def _tiny_dot_kernel(a_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))


def test_compiles_for_every_target():
    out = compile_for_targets(_scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32",
                                              "factor": "fp32"}, {"BLOCK": 256})
    assert set(out) == {t.name for t in TARGETS}
    for compiled in out.values():
        assert "cubin" in compiled.asm


def test_rejects_tiles_that_overflow_shared_memory():
    # 256x256 fp32 dot operands staged in shared memory need more than any target has
    with pytest.raises(AssertionError, match="shared memory"):
        compile_for_targets(_tiny_dot_kernel, {"a_ptr": "*fp32", "c_ptr": "*fp32"}, {"BLOCK": 256},
                            num_stages=3)


def test_small_dot_compiles():
    compile_for_targets(_tiny_dot_kernel, {"a_ptr": "*fp32", "c_ptr": "*fp32"}, {"BLOCK": 32})


def test_launch_hints_follow_the_launcher():
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "factor": "fp32"}
    assert launch_hints(_scale_kernel, sig, {"n": 4096}) == (["x_ptr", "y_ptr", "n"], {})
    assert launch_hints(_scale_kernel, sig, {"n": 1000}) == (["x_ptr", "y_ptr"], {})
    assert launch_hints(_scale_kernel, sig, {"n": 1}) == (["x_ptr", "y_ptr"], {"n": 1})


def test_divisibility_hints_widen_the_loads():
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "factor": "fp32"}
    target = TARGETS[:1]
    plain = compile_for_targets(_scale_kernel, sig, {"BLOCK": 1024}, targets=target)[TARGETS[0].name]
    divisible, _ = launch_hints(_scale_kernel, sig, {"n": 4096})
    hinted = compile_for_targets(_scale_kernel, sig, {"BLOCK": 1024}, targets=target,
                                 divisible=divisible)[TARGETS[0].name]
    assert "ld.global.v4" not in plain.asm["ptx"]
    assert "ld.global.v4" in hinted.asm["ptx"]
