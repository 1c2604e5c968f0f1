"""Fast PSA (mcncl_fast.ops.psa / psa_pool, mcncl_fast/kernels/psa*.py) vs the reference (DESIGN.md §3, §4.1, §6).

On CPU the Triton kernels run through TRITON_INTERPRET=1 (small shapes: the interpreter costs a few
ms per program x loop iteration); on a GPU the same tests run with `-m gpu`. Every buffer a kernel
writes starts as NaN (mcncl_fast/kernels/_common.py POISON), so an unwritten element fails the test.
The shapes are a representative subset of L in {1, 2, 7, 32, 100} x N in {1, 5, 64} x C in {64, 256}:
every value appears, with output and all 13 gradients compared.
"""
from __future__ import annotations

import pytest
import torch

from mcncl_fast import ops
from mcncl_fast.kernels import _common
from mcncl_fast.kernels import psa as psa_kernels
from mcncl_fast.kernels import psa_pool as pool_kernels
from mcncl_fast.reference import ops as reference_ops
from tests.helpers import TOLERANCE, assert_close_rel, kernel_devices, rel_error

GRAD_NAMES = ["x"] + [f"weights[{s}]" for s in range(4)] + [f"biases[{s}]" for s in range(4)] + [
    "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture(autouse=True)
def _no_tf32():
    """On CUDA the reference's conv1d would use TF32 (cuDNN's default): compare against IEEE fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_mask(n, length, device, kind, generator=None):
    """kind: None, "random" (random frame counts, first row fully padded), "scattered" (non-prefix)."""
    if kind is None:
        return None
    if kind == "random":
        lengths = torch.randint(0, length + 1, (n,), generator=generator)
        lengths[0] = 0                                   # a fully padded row
        if n > 2:
            lengths[1] = length                          # and a full one
        return (torch.arange(length)[None, :] < lengths[:, None]).to(device)
    if kind == "scattered":
        mask = torch.rand(n, length, generator=generator) < 0.6
        mask[0] = False                                  # a fully padded row
        return mask.to(device)
    raise ValueError(kind)


def make_inputs(n, length, channels, dtype=torch.float32, device="cpu", mask="random"):
    q = channels // 4
    x = torch.randn(n, length, channels)
    weights = [torch.randn(q, q, 2 * s + 3) / (q * (2 * s + 3)) ** 0.5 for s in range(4)]
    biases = [0.1 * torch.randn(q) for _ in range(4)]
    fc1_w, fc1_b = torch.randn(q, channels) / channels ** 0.5, 0.1 * torch.randn(q)
    fc2_w, fc2_b = torch.randn(channels, q) / q ** 0.5, 0.1 * torch.randn(channels)
    to = dict(device=device, dtype=dtype)
    return ([x.to(**to)], [w.to(**to) for w in weights], [b.to(**to) for b in biases],
            [t.to(**to) for t in (fc1_w, fc1_b, fc2_w, fc2_b)], make_mask(n, length, device, mask))


def leaves(inputs):
    x, weights, biases, fc, mask = inputs
    flat = [t.detach().clone().requires_grad_() for t in x + weights + biases + fc]
    args = (flat[0], flat[1:5], flat[5:9], *flat[9:13])
    return args, flat, mask


def upcast(inputs):
    x, weights, biases, fc, mask = inputs
    return ([t.float() for t in x], [t.float() for t in weights], [t.float() for t in biases],
            [t.float() for t in fc], mask)


def run(fn, inputs, grad_seed=1, grad_dtype=None):
    args, flat, mask = leaves(inputs)
    out = fn(*args, frame_mask=mask)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    g = g.to(grad_dtype or out.dtype).to(out)
    out.backward(g)
    return out, [p.grad for p in flat]


def check_parity(name, inputs, dtype):
    """16-bit inputs: the reference runs in float32 on the same (rounded) inputs and output gradient.
    The reference evaluated in bf16 itself is off by up to 1.6e-1 (fc1 gradients) from a float64
    evaluation, while the fast path (fp32 accumulation) stays within 7e-3 of it."""
    out, grads = run(getattr(ops, name), inputs)
    ref_inputs = upcast(inputs) if dtype in (torch.float16, torch.bfloat16) else inputs
    ref_out, ref_grads = run(getattr(reference_ops, name), ref_inputs, grad_dtype=dtype)
    assert_close_rel(out, ref_out, dtype, f"{name} output")
    for what, gf, gr in zip(GRAD_NAMES, grads, ref_grads):
        assert gf is not None, f"{name}: no gradient for {what}"
        assert_close_rel(gf, gr, dtype, f"{name} grad {what}")
    return out, grads


# (op, N, L, C, dtype, mask kind): every N, L, C value, masks with padded rows, frame_mask=None
PARITY_CASES = [
    ("psa", 1, 1, 64, torch.float32, None),
    ("psa", 5, 2, 256, torch.float32, "random"),
    ("psa", 64, 7, 64, torch.float32, "random"),
    ("psa", 5, 32, 256, torch.float32, "scattered"),
    ("psa", 5, 100, 64, torch.float32, "random"),
    ("psa_pool", 1, 100, 64, torch.float32, None),
    ("psa_pool", 64, 2, 256, torch.float32, "random"),
    ("psa_pool", 5, 32, 64, torch.float32, "random"),
    ("psa", 5, 32, 256, torch.bfloat16, "random"),
    ("psa_pool", 5, 7, 64, torch.bfloat16, "random"),
    ("psa", 5, 7, 64, torch.float16, "random"),
    ("psa_pool", 5, 2, 256, torch.float16, None),
]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("name,n,length,channels,dtype,mask", PARITY_CASES,
                         ids=[f"{c[0]}-N{c[1]}-L{c[2]}-C{c[3]}-{str(c[4])[6:]}-{c[5]}" for c in PARITY_CASES])
def test_parity(device, name, n, length, channels, dtype, mask):
    inputs = make_inputs(n, length, channels, dtype, device, mask)
    out, grads = check_parity(name, inputs, dtype)
    frame_mask = inputs[4]
    if frame_mask is not None:
        padded_rows = ~frame_mask.any(dim=1)
        assert bool(padded_rows.any())
        # fully padded rows: exactly 0 output, 0 input gradient (finiteness is checked by rel_error)
        assert (out[padded_rows] == 0).all()
        assert (grads[0][padded_rows] == 0).all()
        if name == "psa":
            assert (out[~frame_mask] == 0).all()         # every padded frame is 0


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("name", ["psa", "psa_pool"])
@pytest.mark.parametrize("channels", [24, 272], ids=["Q6-one-masked-block", "Q68-two-channel-blocks"])
def test_parity_channel_blocks(device, name, channels):
    """C/4 not a power of two: masked channel blocks; C/4 > 64: several channel blocks per branch."""
    inputs = make_inputs(2, 3, channels, device=device, mask="scattered")
    mask = inputs[4]
    mask[1] = True
    check_parity(name, inputs, torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_all_rows_padded(device):
    inputs = make_inputs(3, 4, 64, device=device, mask=None)
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    inputs = inputs[:4] + (mask,)
    for name in ("psa", "psa_pool"):
        out, grads = run(getattr(ops, name), inputs)
        assert (out == 0).all()
        for what, g in zip(GRAD_NAMES, grads):
            assert torch.isfinite(g).all(), what
        ref_out, ref_grads = run(getattr(reference_ops, name), inputs)
        for what, gf, gr in zip(GRAD_NAMES, grads, ref_grads):
            assert rel_error(gf, gr) < TOLERANCE[torch.float32], what


@pytest.mark.parametrize("device", kernel_devices())
def test_pool_is_masked_mean_of_psa(device):
    """psa_pool == masked mean over valid frames of psa (fast vs fast and vs the reference composition)."""
    x, weights, biases, fc, mask = make_inputs(6, 9, 64, device=device, mask="random")
    args = (x[0], weights, biases, *fc)
    pooled = ops.psa_pool(*args, frame_mask=mask)
    valid = mask.unsqueeze(-1).float()
    composed_fast = (ops.psa(*args, frame_mask=mask) * valid).sum(1) / valid.sum(1).clamp(min=1)
    composed_ref = (reference_ops.psa(*args, frame_mask=mask) * valid).sum(1) / valid.sum(1).clamp(min=1)
    assert_close_rel(pooled, composed_ref, torch.float32, "psa_pool vs reference psa + masked mean")
    assert_close_rel(pooled, composed_fast, torch.float32, "psa_pool vs fast psa + masked mean")


@pytest.mark.parametrize("device", kernel_devices())
def test_non_contiguous_inputs(device):
    """x as a transposed view, weights as views, the output gradient as an expanded tensor."""
    x, weights, biases, fc, mask = make_inputs(3, 4, 64, device=device, mask="random")
    x_t = x[0].transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous()
    weights_t = [w.transpose(0, 1).contiguous().transpose(0, 1) for w in weights]
    for name in ("psa", "psa_pool"):
        outs, grads = [], []
        for fn in (getattr(ops, name), getattr(reference_ops, name)):
            args, flat, _ = leaves(([x_t], weights_t, biases, fc, mask))
            out = fn(*args, frame_mask=mask)
            out.backward(torch.ones((), device=device).expand(out.shape))
            outs.append(out)
            grads.append([p.grad for p in flat])
        assert_close_rel(outs[0], outs[1], torch.float32, f"{name} output")
        for what, gf, gr in zip(GRAD_NAMES, *grads):
            assert_close_rel(gf, gr, torch.float32, f"{name} grad {what}")


@pytest.mark.parametrize("device", kernel_devices())
def test_weight_gradients_deterministic(device):
    inputs = make_inputs(9, 5, 64, device=device)
    for name in ("psa", "psa_pool"):
        _, first = run(getattr(ops, name), inputs)
        _, second = run(getattr(ops, name), inputs)
        for what, a, b in zip(GRAD_NAMES, first, second):
            assert torch.equal(a, b), f"{name} {what}"



def test_psa_pool_device_ops(monkeypatch):
    """psa_pool forward + `.sum().backward()` of the model's PSA module: at most 10 device operations
    (ATen compute ops + Triton launches, counted through the interpreter), with the parameters taken
    as they are (no per-call repacking) and the expanded output gradient read in place."""
    from benchmarks.device_ops import DeviceOps
    from mcncl_fast.modules import PSA
    monkeypatch.setattr(_common, "POISON", False)           # NaN-filled buffers are test-only fills
    module = PSA(32)
    x = torch.randn(5, 7, 32, requires_grad=True)
    mask = make_mask(5, 7, "cpu", "random")
    with DeviceOps() as ops:
        with ops.component("forward"):
            pooled = module.pool(x, mask)
        with ops.component("backward"):
            pooled.sum().backward()          # includes the harness's own sum and its ones_like gradient
    counts = f"{ops.by_component()} (aten, triton): {ops.most_common()}"
    table = ops.by_component()
    assert table["forward"] == (0, 2), counts            # no ATen op: 2 Triton launches
    assert table["backward"][1] == 3, counts             # 3 launches (+ the harness's sum / ones_like)
    assert ops.total <= 10, counts
    assert ops.syncs == [], counts
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


def test_psa_device_ops(monkeypatch):
    """psa (unpooled) forward + backward from a dense output gradient: 3 + 5 Triton launches, no ATen op."""
    from benchmarks.device_ops import DeviceOps
    from mcncl_fast.modules import PSA
    monkeypatch.setattr(_common, "POISON", False)
    module = PSA(32)
    x = torch.randn(5, 7, 32, requires_grad=True)
    mask = make_mask(5, 7, "cpu", "random")
    grad = torch.randn(5, 7, 32)
    with DeviceOps() as ops:
        with ops.component("forward"):
            out = module(x, mask)
        with ops.component("backward"):
            out.backward(grad)
    assert ops.by_component() == {"forward": (0, 3), "backward": (0, 5)}, ops.most_common()


@pytest.mark.parametrize("device", kernel_devices())
def test_torch_compile_fullgraph(device):
    class Pooled(torch.nn.Module):
        def __init__(self, psa):
            super().__init__()
            self.psa = psa

        def forward(self, frames, frame_mask):
            args = self.psa.op_args()
            full = ops.psa(frames, *args, frame_mask=frame_mask)
            return ops.psa_pool(frames, *args, frame_mask=frame_mask), full

    from mcncl_fast.reference.model import PSA
    module = Pooled(PSA(64)).to(device)
    frames = torch.randn(4, 6, 64, device=device, requires_grad=True)
    mask = make_mask(4, 6, device, "random")
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    pooled, full = compiled(frames, mask)
    (pooled.sum() + (full * full).sum()).backward()
    grads = [frames.grad] + [p.grad for p in module.parameters()]
    frames.grad = None
    module.zero_grad()
    with torch.no_grad():
        args = module.psa.op_args()
        ref_pooled = reference_ops.psa_pool(frames, *args, frame_mask=mask)
    assert_close_rel(pooled, ref_pooled, torch.float32, "compiled psa_pool")
    pooled_eager, full_eager = module(frames, mask)
    (pooled_eager.sum() + (full_eager * full_eager).sum()).backward()
    for g, ge in zip(grads, [frames.grad] + [p.grad for p in module.parameters()]):
        assert_close_rel(g, ge, torch.float32, "compiled vs eager gradient")


@pytest.mark.parametrize("device", kernel_devices())
def test_fast_model_matches_reference_model(device):
    from mcncl_fast import Model, ModelConfig
    from mcncl_fast.reference import Model as ReferenceModel
    cfg = ModelConfig(text_dim=12, audio_dim=10, visual_dim=14, d_model=64, num_layers=1, num_heads=4,
                      proj_dim=16, num_classes=3, dropout=0.0)
    ref = ReferenceModel(cfg).to(device)
    fast = Model(cfg).to(device)
    fast.load_state_dict(ref.state_dict())
    b, s, length = 2, 3, 5
    batch = dict(text=torch.randn(b, s, 12, device=device), audio=torch.randn(b, s, 10, device=device),
                 visual=torch.randn(b, s, length, 14, device=device),
                 utterance_mask=torch.tensor([[True, True, True], [True, True, False]], device=device),
                 frame_mask=make_mask(b * s, length, device, "random").reshape(b, s, length),
                 labels=torch.tensor([[0, 1, 2], [1, 0, 0]], device=device))
    out_ref, out_fast = ref(**batch), fast(**batch)
    out_ref.loss.backward()
    out_fast.loss.backward()
    assert_close_rel(out_fast.logits, out_ref.logits, torch.float32, "logits")
    assert_close_rel(out_fast.loss, out_ref.loss, torch.float32, "loss")
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        if name.startswith(("psa.", "encoders.v")):
            assert_close_rel(fast_params[name].grad, p.grad, torch.float32, f"grad {name}")


def test_float64_takes_the_reference():
    inputs = make_inputs(2, 3, 64, dtype=torch.float64)
    for name in ("psa", "psa_pool"):
        out, grads = run(getattr(ops, name), inputs)
        ref_out, ref_grads = run(getattr(reference_ops, name), inputs)
        assert out.dtype == torch.float64 and torch.equal(out, ref_out)
        for what, gf, gr in zip(GRAD_NAMES, grads, ref_grads):
            assert torch.equal(gf, gr), what


def _args(n=2, length=3, channels=64, mask="random"):
    x, weights, biases, fc, frame_mask = make_inputs(n, length, channels, mask=mask)
    return dict(x=x[0], weights=weights, biases=biases, fc1_weight=fc[0], fc1_bias=fc[1], fc2_weight=fc[2],
                fc2_bias=fc[3], frame_mask=frame_mask)


def _bad_inputs():
    ok = _args()
    cases = []

    def case(label, exc, match, **changes):
        cases.append(pytest.param(dict(ok, **changes), exc, match, id=label))

    case("C-not-multiple-of-4", ValueError, "x: channel count", x=torch.randn(2, 3, 66))
    case("x-2d", ValueError, "x: expected a 3-D", x=torch.randn(3, 64))
    case("x-int", TypeError, "x: expected dtype", x=torch.ones(2, 3, 64, dtype=torch.int64))
    case("weights-3", TypeError, "weights: expected a sequence of 4", weights=ok["weights"][:3])
    case("weight-kernel-size", ValueError, r"weights\[2\]: expected shape \(16, 16, 7\)",
         weights=ok["weights"][:2] + [torch.randn(16, 16, 5)] + ok["weights"][3:])
    case("weight-channels", ValueError, r"weights\[0\]: expected shape", weights=[torch.randn(16, 8, 3)]
         + ok["weights"][1:])
    case("bias-shape", ValueError, r"biases\[3\]: expected shape \(16,\)",
         biases=ok["biases"][:3] + [torch.randn(17)])
    case("fc1-shape", ValueError, "fc1_weight: expected shape", fc1_weight=torch.randn(64, 16))
    case("fc2-bias", ValueError, "fc2_bias: expected shape", fc2_bias=torch.randn(16))
    case("param-dtype", TypeError, "fc2_weight: expected dtype torch.float32",
         fc2_weight=ok["fc2_weight"].double())
    case("mask-dtype", TypeError, "frame_mask: expected dtype", frame_mask=torch.ones(2, 3))
    case("mask-shape", ValueError, r"frame_mask: expected shape \(2, 3\)",
         frame_mask=torch.ones(2, 4, dtype=torch.bool))
    return cases


@pytest.mark.parametrize("name", ["psa", "psa_pool"])
@pytest.mark.parametrize("kwargs,exc,match", _bad_inputs())
def test_bad_inputs(name, kwargs, exc, match, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched before the input check")
    monkeypatch.setattr(psa_kernels, "psa_fwd", no_launch)
    monkeypatch.setattr(pool_kernels, "psa_pool_fwd", no_launch)
    with pytest.raises(exc, match=match):
        getattr(ops, name)(**kwargs)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("op", ["psa_fwd", "psa_pool_fwd"])
def test_opcheck(op, device):
    """Schema, autograd registration and fake-tensor checks of the custom ops (torch.compile tracing is
    covered by test_torch_compile_fullgraph)."""
    x, weights, biases, fc, mask = make_inputs(3, 4, 64, device=device, mask="random")
    grad = lambda ts: [t.requires_grad_() for t in ts]  # noqa: E731
    args = (*grad(x), grad(weights), grad(biases), *grad(fc), mask)
    torch.library.opcheck(getattr(torch.ops.mcncl_fast, op), args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
