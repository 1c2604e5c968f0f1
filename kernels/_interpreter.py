"""Work-arounds for the Triton CPU interpreter (TRITON_INTERPRET=1), applied on import.

triton 3.9's interpreter multiplies bfloat16 `tl.dot` operands as raw uint16
bit patterns (results ~1e10 off). On a GPU, bf16 dots multiply bf16 values
and accumulate in fp32; converting the operands to fp32 first gives exactly
those products, so the interpreter then agrees with the GPU. No-op on GPUs.
"""
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    _create_dot = _interp.InterpreterBuilder.create_dot
    if not getattr(_create_dot, "_mcncl_bf16_fixed", False):
        def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype.scalar == tl.bfloat16:
                a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
            return _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        _create_dot_bf16._mcncl_bf16_fixed = True
        _interp.InterpreterBuilder.create_dot = _create_dot_bf16
