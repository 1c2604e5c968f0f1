"""Fast attention (Triton) vs the reference and SDPA: outputs and dq/dk/dv (DESIGN.md §4.2, §6).

On CPU the kernels run through TRITON_INTERPRET=1 (small B·H); on a GPU with `-m gpu`.
Every output buffer the kernels write is NaN-poisoned first (autouse fixture).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mcncl_fast.kernels.attention as kernels
from mcncl_fast.kernels import _common
from mcncl_fast import ops
from mcncl_fast.reference import ops as ref
from tests.helpers import INTERPRET, TOLERANCE, assert_close_rel, kernel_devices

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="no Triton device: needs TRITON_INTERPRET=1 or CUDA")


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """NaN for float buffers; -1 for the int32 key ends (a bound that skips every key: an unwritten
    entry shows up as a zero output where the reference has none)."""
    monkeypatch.setattr(_common, "POISON", True)


def _inputs(shape_q, lk, dtype, device, mask_kind="random"):
    *lead, lq, dh = shape_q
    b = lead[-2]
    make = lambda length: torch.randn(*lead, length, dh, device=device).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = make(lq), make(lk), make(lk)
    mask = None
    if mask_kind == "random":
        mask = torch.rand(b, lk, device=device) > 0.35
        mask[:, 0] = True                       # every entry has a key ...
        if b > 1:
            mask[-1] = False                    # ... except the last: a fully masked batch entry
    elif mask_kind == "prefix":                 # dialogue padding: valid utterances first
        lengths = torch.randint(1, lk + 1, (b,), device=device)
        mask = torch.arange(lk, device=device)[None, :] < lengths[:, None]
    elif mask_kind == "holes":                  # not a prefix: a masked run in the middle, the last key valid
        mask = _holes_mask(b, lk, device)
    return q, k, v, mask


def _holes_mask(b, lk, device, seed=None):
    """[b, lk]: random keys with every key of [lk/4, 3lk/4) masked, the first and last keys valid;
    the last entry (b > 1) fully masked."""
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(b, lk, device=device, generator=gen) > 0.4
    mask[:, lk // 4: (3 * lk) // 4] = False
    mask[:, 0] = mask[:, -1] = True
    if b > 1:
        mask[-1] = False
    return mask


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _check_against_reference(q, k, v, mask, scale=None, fn=ops.attention, ref_fn=ref.attention):
    out = fn(q, k, v, mask, scale)
    grad_out = torch.randn_like(out)
    grads = _grads(out, (q, k, v), grad_out)
    out_ref = ref_fn(q, k, v, mask, scale)
    grads_ref = _grads(out_ref, (q, k, v), grad_out)
    key = q.dtype
    assert_close_rel(out, out_ref, key, "out")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close_rel(g, g_ref, key, name)
    return out, grads


# (B, H, Lq, Lk, Dh, dtype, mask kind)
CASES = [
    (2, 2, 17, 50, 32, torch.float32, "random"),      # Lq < Lk, fully masked batch entry
    (2, 2, 50, 17, 32, torch.float32, "prefix"),      # Lq > Lk
    (1, 2, 1, 3, 16, torch.float32, "random"),        # Lq = 1
    (2, 1, 3, 1, 64, torch.float32, "random"),        # Lk = 1 (second entry fully masked)
    (2, 1, 130, 130, 128, torch.float32, "random"),   # several tiles both ways
    (2, 2, 33, 33, 64, torch.float32, None),          # no mask
    (2, 2, 33, 17, 32, torch.bfloat16, "random"),
    (2, 1, 50, 33, 64, torch.float16, "random"),
    (1, 2, 17, 3, 128, torch.bfloat16, None),
    (2, 1, 3, 130, 16, torch.float16, "prefix"),
    (3, 1, 5, 200, 16, torch.float32, "holes"),       # a hole over a whole 64-key tile, fully masked entry
    (2, 2, 17, 9, 32, torch.float32, "holes"),
    (2, 1, 33, 70, 64, torch.bfloat16, "holes"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,h,lq,lk,dh,dtype,mask_kind", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference(device, b, h, lq, lk, dh, dtype, mask_kind):
    q, k, v, mask = _inputs((b, h, lq, dh), lk, dtype, device, mask_kind)
    _check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lq,lk", [(3, 0), (0, 4)])
def test_empty_sequences(device, lq, lk):
    q, k, v, mask = _inputs((2, 1, lq, 16), lk, torch.float32, device, mask_kind=None)
    for m in (None, torch.ones(2, lk, dtype=torch.bool, device=device)):
        out, (dq, dk, dv) = _check_against_reference(q, k, v, m)
        assert out.shape == (2, 1, lq, 16) and (out == 0).all() and (dq == 0).all() and (dk == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_custom_scale(device):
    q, k, v, mask = _inputs((2, 1, 17, 32), 17, torch.float32, device)
    _check_against_reference(q, k, v, mask, scale=0.37)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_sdpa_on_rows_with_keys(device, dtype):
    """SDPA with the converted mask gives NaN where every key is masked: compare the other entries."""
    q, k, v, mask = _inputs((3, 2, 17, 32), 50, dtype, device)
    keep = mask.any(dim=1)
    assert not keep.all() and keep.any()
    out = ops.attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    grads = _grads(out, (q, k, v), grad_out)
    sub = [t.detach()[keep].requires_grad_() for t in (q, k, v)]
    up = lambda t: t.float() if t.device.type == "cpu" else t  # noqa: E731  (CPU SDPA: no half kernels)
    out_sdpa = F.scaled_dot_product_attention(*(up(t) for t in sub), attn_mask=mask[keep][:, None, None, :])
    grads_sdpa = _grads(out_sdpa, sub, up(grad_out[keep]))
    assert_close_rel(out[keep], out_sdpa, dtype, "out")
    for name, g, g_sdpa in zip(("dq", "dk", "dv"), grads, grads_sdpa):
        assert_close_rel(g[keep], g_sdpa, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_exact_zeros(device):
    q, k, v, mask = _inputs((2, 2, 5, 32), 7, torch.float32, device)
    mask[0, 3:] = False
    out = ops.attention(q, k, v, mask)
    dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
        assert (t[1] == 0).all()                 # batch entry 1 has no valid key
    assert (dk[0, :, 3:] == 0).all() and (dv[0, :, 3:] == 0).all()   # masked keys get no gradient
    assert (out[0] != 0).any() and (dk[0, :, :3] != 0).any()


# ------------------------------------------------------------------------------ grouped
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_group_mask", [False, True])
def test_grouped_equals_loop_of_singles(device, per_group_mask):
    g, b, h, lq, lk, dh = 3, 2, 2, 17, 33, 32
    q, k, v, mask = _inputs((g, b, h, lq, dh), lk, torch.float32, device)
    if per_group_mask:
        mask = torch.stack([mask, mask.roll(1, dims=1), torch.ones_like(mask)])
    out = ops.attention_grouped(q, k, v, mask)
    grad_out = torch.randn_like(out)
    grads = _grads(out, (q, k, v), grad_out)
    for i in range(g):
        m = mask[i] if per_group_mask else mask
        single = ops.attention(q[i], k[i], v[i], m)
        single_grads = _grads(single, (q, k, v), grad_out[i])
        assert torch.equal(out[i], single)
        for name, grad, single_grad in zip(("dq", "dk", "dv"), grads, single_grads):
            assert torch.equal(grad[i], single_grad[i]), name
    # and against the reference
    _check_against_reference(q, k, v, mask, fn=ops.attention_grouped, ref_fn=_reference_loop)


def _reference_loop(q, k, v, mask, scale=None):
    masks = [mask if mask is None or mask.dim() == 2 else mask[i] for i in range(q.shape[0])]
    return torch.stack([ref.attention(q[i], k[i], v[i], masks[i], scale) for i in range(q.shape[0])])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_grouped_per_group_masks_with_holes(device, dtype):
    """[G, B, Lk] masks that differ per group: holes, and a fully masked entry at a different b in each
    group (each (g, b) reads its own key end)."""
    g, b, h, lq, lk, dh = 3, 3, 2, 9, 70, 32
    q, k, v, _ = _inputs((g, b, h, lq, dh), lk, dtype, device, mask_kind=None)
    mask = torch.stack([_holes_mask(b, lk, device, seed=i).roll(i, dims=0) for i in range(g)])
    mask[1, 1, : lk - 5] = False                       # group 1, entry 1: only keys in the last tile valid
    assert mask[1, 1].any()
    assert [int(i) for i in (~mask.any(-1)).nonzero()[:, 1]] == [2, 0, 1]   # a fully masked entry per group
    out, _ = _check_against_reference(q, k, v, mask, fn=ops.attention_grouped, ref_fn=_reference_loop)
    for i, empty in enumerate((2, 0, 1)):
        assert (out[i, empty] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 3), (2, 40, 300), (3, 7, 1), (0, 4)], ids=str)
def test_keys_end(device, shape):
    """1 + the last valid key per mask row, 0 for a row without one; several programs (rows > 16) and
    several column steps (Lk > 128); a mask view whose rows are not contiguous."""
    lk = shape[-1]
    wide = torch.rand(*shape[:-1], lk + 5, device=device) > 0.7
    mask = wide[..., :lk]                              # row stride lk + 5
    if mask.numel():
        mask.view(-1, lk)[::3] = False                 # rows without a valid key
        mask.view(-1, lk)[1::5, -1] = True             # rows whose last key is valid
    cols = torch.arange(1, lk + 1, device=device, dtype=torch.int32)
    expected = torch.where(mask, cols, 0).amax(-1) if lk else torch.zeros(shape[:-1], dtype=torch.int32)
    end = kernels.keys_end(mask)
    assert end.dtype == torch.int32 and end.shape == mask.shape[:-1]
    assert torch.equal(end.cpu(), expected.cpu().to(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_head_split_views_keep_their_layout(device):
    """q/k/v as head-split views of [B, S, H·Dh] (no copy): the output has q's layout, so merge is a view."""
    b, s, h, dh = 2, 17, 2, 32
    x = torch.randn(b, s, h * dh, device=device)
    split = lambda t: t.view(b, s, h, dh).transpose(1, 2).detach().requires_grad_()  # noqa: E731
    q, k, v = split(x), split(x.flip(1)), split(x * 0.5)
    mask = torch.arange(s, device=device)[None, :] < torch.tensor([[s], [9]], device=device)
    out, (dq, _, _) = _check_against_reference(q, k, v, mask)
    assert out.stride() == q.stride() and dq.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()
    # a head dim that is not contiguous is copied first, same values
    q2 = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert q2.stride(-1) != 1
    _check_against_reference(q2, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_every_config_in_the_interpreter(device):
    """The autotuner runs only the first config under the interpreter: run each one explicitly,
    on shapes with several tiles and a fully masked key tile (skipped)."""
    q, k, v, mask = _inputs((2, 1, 50, 32), 70, torch.float32, device)
    mask[0, 16:48] = False
    scale = 32 ** -0.5
    x = [t.detach().unsqueeze(0) for t in (q, k, v)]
    out_ref = ref.attention(q, k, v, mask)
    grad_out = torch.randn_like(out_ref)
    grads_ref = _grads(out_ref, (q, k, v), grad_out)
    configs = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]): c
               for c in kernels.FWD_CONFIGS + kernels.DQ_CONFIGS + kernels.DKDV_CONFIGS}
    for config in configs.values():
        out, lse, key_end = kernels.attention_fwd(*x, mask, scale, config=config)
        assert_close_rel(out[0], out_ref, torch.float32, f"out {config}")
        grads = kernels.attention_bwd(grad_out.unsqueeze(0), *x, out, lse, mask, scale, config=config,
                                           key_end=key_end)
        for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close_rel(g[0], g_ref, torch.float32, f"{name} {config}")


# ------------------------------------------------------------------------------ key ends, autograd
class _LaunchSpy:
    """Stands in for a @triton.jit kernel: counts `kernel[grid](...)` launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouped", [False, True])
def test_key_end_computed_once_in_forward_not_in_backward(device, grouped, monkeypatch):
    spy = _LaunchSpy(kernels._keys_end_kernel)
    monkeypatch.setattr(kernels, "_keys_end_kernel", spy)
    backward = kernels.attention_bwd
    seen = []
    monkeypatch.setattr(kernels, "attention_bwd",
                        lambda *a, **kw: seen.append(kw.get("key_end")) or backward(*a, **kw))
    shape = (3, 2, 2, 17, 32) if grouped else (2, 2, 17, 32)
    q, k, v, mask = _inputs(shape, 40, torch.float32, device, mask_kind="holes")
    fn, ref_fn = (ops.attention_grouped, _reference_loop) if grouped else (ops.attention, ref.attention)
    out = fn(q, k, v, mask)
    assert spy.launches == 1
    _grads(out, (q, k, v), torch.randn_like(out))
    assert spy.launches == 1                           # the backward reuses the forward's key ends
    fn(q, k, v, None)                                  # no mask: no key ends
    assert spy.launches == 1
    assert len(seen) == 1 and seen[0].dtype == torch.int32 and seen[0].shape == mask.shape[:-1]
    assert torch.equal(seen[0], kernels.keys_end(mask))
    _check_against_reference(q, k, v, mask, fn=fn, ref_fn=ref_fn)


@pytest.mark.skipif(not INTERPRET, reason="device operations are counted through the interpreter")
def test_device_ops_per_call():
    """Forward: the key-end launch + the attention launch, nothing else; backward: the dq and dk/dv
    launches only (the key ends come from the forward)."""
    from benchmarks.device_ops import DeviceOps
    q, k, v, mask = _inputs((3, 2, 2, 17, 32), 40, torch.float32, "cpu", mask_kind="holes")
    with DeviceOps() as fwd:
        out = ops.attention_grouped(q, k, v, mask)
    grad_out = torch.randn_like(out)
    with DeviceOps() as bwd:
        _grads(out, (q, k, v), grad_out)
    assert [name for _, _, name in fwd.records] == ["_keys_end_kernel", "_attn_fwd_kernel"], fwd.records
    assert [name for _, _, name in bwd.records] == ["_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"], bwd.records
    assert fwd.syncs == bwd.syncs == []


class _DropGrad(torch.autograd.Function):
    """Uses its input in the forward, passes no gradient back to it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouped", [False, True])
def test_gradient_through_part_of_the_graph(device, grouped, monkeypatch):
    """Grads are not materialised: where the output's gradient is None nothing launches and q/k/v get
    no gradient from the op; where part of the output is used the grads match the reference."""
    shape = (2, 2, 2, 9, 16) if grouped else (2, 2, 9, 16)
    q, k, v, mask = _inputs(shape, 12, torch.float32, device, mask_kind="holes")
    fn, ref_fn = (ops.attention_grouped, _reference_loop) if grouped else (ops.attention, ref.attention)
    w = torch.randn(q.shape[:-2] + (4, q.shape[-1]), device=device)

    def loss(attn):                                    # only rows 2..5 of the output are used
        out = attn(q, k, v, mask)
        return (out[..., 2:6, :] * w).sum() + q.square().sum()

    grads = _grads(loss(fn), (q, k, v), None)
    grads_ref = _grads(loss(ref_fn), (q, k, v), None)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close_rel(g, g_ref, torch.float32, name)

    launched = []
    backward = kernels.attention_bwd
    monkeypatch.setattr(kernels, "attention_bwd", lambda *a, **kw: launched.append(1) or backward(*a, **kw))
    out = fn(q, k, v, mask)
    dq, dk = torch.autograd.grad(_DropGrad.apply(out).sum() + q.square().sum(), (q, k), allow_unused=True)
    assert launched == []
    assert torch.equal(dq, 2 * q.detach()) and dk is None


# ------------------------------------------------------------------------------ tracing
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v, mask = _inputs((2, 2, 17, 32), 9, torch.float32, device)

    def fn(q, k, v, mask):
        single = ops.attention(q, k, v, mask)
        grouped = ops.attention_grouped(torch.stack([q, q * 2]), torch.stack([k, k]), torch.stack([v, v.flip(2)]), mask)
        return single.sum() + grouped.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, mask)
    grads = _grads(loss, (q, k, v), None)
    loss_eager = fn(q, k, v, mask)
    grads_eager = _grads(loss_eager, (q, k, v), None)
    assert_close_rel(loss, loss_eager, torch.float32, "loss")
    for g, g_eager in zip(grads, grads_eager):
        assert_close_rel(g, g_eager, torch.float32, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    from mcncl_fast.ops.attention import _attention_fwd
    q, k, v, mask = _inputs((2, 1, 2, 5, 16), 7, torch.float32, device)
    torch.library.opcheck(_attention_fwd, (q, k, v, mask, 0.25))
    torch.library.opcheck(_attention_fwd, (q, k, v, None, 0.25))
    per_group = torch.stack([mask, ~mask])
    torch.library.opcheck(_attention_fwd, (q.expand(2, *q.shape[1:]), k.expand(2, *k.shape[1:]),
                                           v.expand(2, *v.shape[1:]), per_group, 0.25))
    from mcncl_fast.ops.attention import _attention_bwd
    x = [t.detach() for t in (q, k, v)]
    for m in (mask, None):
        out, lse, key_end = _attention_fwd(*x, m, 0.25)
        torch.library.opcheck(_attention_bwd, (torch.randn_like(out), *x, out, lse, m, key_end, 0.25))


# ------------------------------------------------------------------------------ dispatch, errors
def test_reference_backend_skips_the_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")
    monkeypatch.setattr(kernels, "attention_fwd", boom)
    q, k, v, mask = _inputs((2, 1, 5, 16), 4, torch.float32, "cpu")
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")
    assert torch.equal(ops.attention(q, k, v, mask), ref.attention(q, k, v, mask))
    monkeypatch.delenv("MCNCL_FAST_BACKEND")
    # unsupported head dim / dtype take the reference too
    q, k, v, mask = _inputs((2, 1, 5, 24), 4, torch.float32, "cpu")
    assert torch.equal(ops.attention(q, k, v, mask), ref.attention(q, k, v, mask))
    q, k, v, mask = _inputs((2, 2, 1, 5, 16), 4, torch.float64, "cpu")
    assert torch.equal(ops.attention_grouped(q, k, v, mask), _reference_loop(q, k, v, mask))


def _bad_call(fn, q, k, v, mask=None, scale=None):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched before the checks")
    kernels_fwd = kernels.attention_fwd
    kernels.attention_fwd = boom
    try:
        return fn(q, k, v, mask, scale)
    finally:
        kernels.attention_fwd = kernels_fwd


def test_bad_inputs_raise_before_launch():
    q = torch.randn(2, 2, 5, 16)
    kv = torch.randn(2, 2, 7, 16)
    good_mask = torch.ones(2, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match="k: expected shape"):
        _bad_call(ops.attention, q, torch.randn(2, 2, 7, 32), kv)
    with pytest.raises(ValueError, match="v: expected shape"):
        _bad_call(ops.attention, q, kv, torch.randn(2, 2, 6, 16))
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        _bad_call(ops.attention, q, kv, kv, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype"):
        _bad_call(ops.attention, q, kv, kv, torch.ones(2, 7))
    with pytest.raises(ValueError, match="key_padding_mask: expected device"):
        _bad_call(ops.attention, q, kv, kv, good_mask.to("meta"))
    with pytest.raises(ValueError, match="k: expected device"):
        _bad_call(ops.attention, q, kv.to("meta"), kv)
    with pytest.raises(TypeError, match="v: expected dtype"):
        _bad_call(ops.attention, q, kv, kv.half())
    with pytest.raises(ValueError, match="q: expected a 4-D"):
        _bad_call(ops.attention, q[0], kv, kv)
    with pytest.raises(ValueError, match="scale"):
        _bad_call(ops.attention, q, kv, kv, good_mask, -1.0)
    # grouped
    gq, gkv = q.expand(3, *q.shape), kv.expand(3, *kv.shape)
    with pytest.raises(ValueError, match="q: expected a 5-D"):
        _bad_call(ops.attention_grouped, q, kv, kv)
    with pytest.raises(ValueError, match="k: expected shape"):
        _bad_call(ops.attention_grouped, gq, kv.expand(2, *kv.shape), gkv)
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        _bad_call(ops.attention_grouped, gq, gkv, gkv, good_mask.expand(2, 2, 7))
    with pytest.raises(ValueError, match="key_padding_mask: expected a 2-D or 3-D"):
        _bad_call(ops.attention_grouped, gq, gkv, gkv, good_mask[0])


# ------------------------------------------------------------------------------ model
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_source", ["input", "layer"])
def test_fast_model_matches_reference_model(device, kv_source, monkeypatch):
    """mcncl_fast.Model's attention hook (one grouped launch per sub-layer) vs reference.Model, same
    state_dict. PSA and SupCon stay on the reference here (their parity is tested with their ops)."""
    import mcncl_fast
    from mcncl_fast import reference

    launches = []
    forward = kernels.attention_fwd
    monkeypatch.setattr(kernels, "attention_fwd", lambda q, *a, **kw: launches.append(q.shape[0]) or forward(
        q, *a, **kw))
    class FastAttentionModel(mcncl_fast.Model):       # only the attention hook differs from the reference
        ops = reference.ops
        psa_cls = reference.model.PSA

    cfg = mcncl_fast.ModelConfig(text_dim=12, audio_dim=6, visual_dim=10, d_model=32, num_layers=2, num_heads=1,
                                 proj_dim=8, num_classes=4, dropout=0.0, kv_source=kv_source)
    fast = FastAttentionModel(cfg).to(device)
    slow = reference.Model(cfg).to(device)
    slow.load_state_dict(fast.state_dict())
    b, s, frames = 3, 5, 3
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1, 3:] = False
    mask[2] = False                                   # a dialogue with no valid utterance
    batch = dict(text=torch.randn(b, s, 12, device=device), audio=torch.randn(b, s, 6, device=device),
                 visual=torch.randn(b, s, frames, 10, device=device), utterance_mask=mask,
                 labels=torch.randint(0, 4, (b, s), device=device))
    out_fast, out_slow = fast(**batch), slow(**batch)
    assert launches == [3] * (2 * cfg.num_layers)     # one grouped launch per sub-layer
    assert_close_rel(out_fast.logits, out_slow.logits, torch.float32, "logits")
    assert_close_rel(out_fast.loss, out_slow.loss, torch.float32, "loss")
    out_fast.loss.backward()
    out_slow.loss.backward()
    slow_params = dict(slow.named_parameters())
    fast_grads = fast.per_stream_gradients()          # the stacked weights' gradients under the reference's names
    assert list(fast_grads) == list(slow_params)
    for name, grad in fast_grads.items():
        if name.endswith("k_proj.bias"):
            # softmax ignores a per-row constant, so this gradient is 0 up to rounding: compare it
            # in absolute terms, against the scale of the k_proj.weight gradient
            scale = slow_params[name.replace("bias", "weight")].grad.norm()
            assert (grad - slow_params[name].grad).norm() < TOLERANCE[torch.float32] * scale, name
            continue
        assert_close_rel(grad, slow_params[name].grad, torch.float32, name)
