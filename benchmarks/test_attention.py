"""Cross-attention forward + backward: SDPA vs reference vs torch.compile(reference) vs fast.

Dialogue shapes (GPU): B = 64 dialogues, H = 8, Dh = 32, L in {16, 33, 110} utterances, key padding
(every dialogue has >= 1 utterance, so SDPA has no NaN rows), 3 streams per step as in one MCN
sub-layer: every impl runs 3 attentions, `fast-grouped` runs them as one launch.
Long shapes (GPU): B = 4, H = 8, Dh = 32, L in {1024, 4096}, one attention.
MCN layer: one layer of the model (3 streams x 2 cross-attentions + FFN, forward + backward),
reference eager vs fast, and the fast model's glue variants (how q/k/v are stacked and merged).
Targets on a GPU: fast-grouped >= 1.5x sdpa on dialogue shapes, fast >= 1.0x sdpa on long ones.
On CPU one tiny shape runs (the fast ops take the reference path there: the numbers only show
that the harness works); compiled variants are GPU-only.
"""
import pytest
import torch
import torch.nn.functional as F

import mcncl_fast
from mcncl_fast import ops, reference
from mcncl_fast.reference import ops as reference_ops

from .conftest import CUDA

H, DH, STREAMS = 8, 32, 3
DIALOGUE = [(64, 16), (64, 33), (64, 110)] if CUDA else [(4, 16)]
LONG = [(4, 1024), (4, 4096)] if CUDA else []
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
IMPLS = ["sdpa", "reference", "reference-compiled", "fast", "fast-grouped"]
_dtype_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


def make_case(b, length, dtype, device, streams):
    torch.manual_seed(0)
    shape = (streams, b, H, length, DH)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    lengths = torch.randint(1, length + 1, (b,), device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]
    grad = torch.randn(shape, device=device, dtype=dtype)
    return q, k, v, mask, grad


def make_step(impl, q, k, v, mask, grad):
    sdpa_mask = mask[:, None, None, :]
    single = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
              "reference": lambda q, k, v: reference_ops.attention(q, k, v, mask),
              "fast": lambda q, k, v: ops.attention(q, k, v, mask)}
    single["reference-compiled"] = torch.compile(single["reference"])
    if impl == "fast-grouped":
        def forward():
            return ops.attention_grouped(q, k, v, mask)
    else:
        fn = single[impl]

        def forward():
            return torch.stack([fn(q[g], k[g], v[g]) for g in range(q.shape[0])])

    def step():
        return torch.autograd.grad(forward(), (q, k, v), grad)
    return step


def _run(impl, b, length, dtype, streams, device, run_benchmark):
    if impl == "reference-compiled" and not CUDA:
        pytest.skip("inductor compile on 2 CPU cores takes tens of seconds")
    step = make_step(impl, *make_case(b, length, dtype, device, streams))
    step()                                             # compile / autotune outside the timing
    run_benchmark(step, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("b,length", DIALOGUE, ids=[f"B{b}-L{n}" for b, n in DIALOGUE])
def test_dialogue_attention(b, length, dtype, impl, run_benchmark, benchmark, device):
    benchmark.group = f"attention-dialogue-{_dtype_id(dtype)}-B{b}-H{H}-L{length}-Dh{DH}-x{STREAMS}"
    _run(impl, b, length, dtype, STREAMS, device, run_benchmark)


@pytest.mark.skipif(not LONG, reason="GPU-only shapes")
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "fast-grouped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("b,length", LONG or [(0, 0)], ids=[f"B{b}-L{n}" for b, n in LONG or [(0, 0)]])
def test_long_attention(b, length, dtype, impl, run_benchmark, benchmark, device):
    benchmark.group = f"attention-long-{_dtype_id(dtype)}-B{b}-H{H}-L{length}-Dh{DH}"
    _run(impl, b, length, dtype, 1, device, run_benchmark)


# ----------------------------------------------------------------------------- one MCN layer
class FastContiguousStack(mcncl_fast.Model):
    """Glue variant: stack the head-split projections as they come (a [G, B, H, S, Dh] copy);
    the output is then [G, B, H, S, Dh] contiguous and every merge copies."""

    def _cross_attend(self, attns, queries, keys, key_padding_mask):
        projected = [attn.project(query, key_value) for attn, query, key_value in zip(attns, queries, keys)]
        q, k, v = (torch.stack([p[i] for p in projected]) for i in range(3))
        out = ops.attention_grouped(q, k, v, key_padding_mask)
        return [attn.merge(out[g]) for g, attn in enumerate(attns)]


class FastPerStream(mcncl_fast.Model):
    """Glue variant: one single-attention launch per stream on the head-split views (no stack copy,
    merge is a view), 3 launches per sub-layer."""

    def _cross_attend(self, attns, queries, keys, key_padding_mask):
        outs = []
        for attn, query, key_value in zip(attns, queries, keys):
            outs.append(attn.merge(ops.attention(*attn.project(query, key_value), key_padding_mask)))
        return outs


LAYER_IMPLS = {"reference": reference.Model, "fast": mcncl_fast.Model,
               "fast-contiguous-stack": FastContiguousStack, "fast-per-stream": FastPerStream}


@pytest.mark.parametrize("impl", list(LAYER_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("b,length", DIALOGUE, ids=[f"B{b}-L{n}" for b, n in DIALOGUE])
def test_mcn_layer(b, length, dtype, impl, run_benchmark, benchmark, device):
    """One MCN layer (kv_source="input"), forward + backward, d = 256, H = 8."""
    benchmark.group = f"mcn-layer-{_dtype_id(dtype)}-B{b}-S{length}"
    torch.manual_seed(0)
    cfg = mcncl_fast.ModelConfig(num_layers=1, dropout=0.0)
    model = LAYER_IMPLS[impl](cfg).to(device=device, dtype=dtype)
    d = cfg.d_model
    unimodal = {m: torch.randn(b, length, d, device=device, dtype=dtype, requires_grad=True) for m in "tav"}
    lengths = torch.randint(1, length + 1, (b,), device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]
    grads = [torch.randn(b, length, d, device=device, dtype=dtype) for _ in range(3)]
    params = list(model.layers.parameters()) + list(unimodal.values())

    def step():
        fused = model.fuse(unimodal, mask)
        return torch.autograd.grad([fused[m] for m in "tav"], params, grads)
    step()
    run_benchmark(step, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1)
