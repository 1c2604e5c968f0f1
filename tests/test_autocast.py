"""Under torch.autocast, PSA and attention run in the autocast dtype (like matmul-class ops),
the SupCon loss keeps its inputs and accumulates in fp32; the model trains under bf16 autocast."""
import pytest
import torch

import mcncl_fast
from mcncl_fast import ops, reference

from tests.test_model import TINY, make_batch

OPS = {"reference": reference.ops, "fast": ops}


def psa_args(n=3, length=5, c=16):
    q = c // 4
    return (torch.randn(n, length, c, dtype=torch.bfloat16), [torch.randn(q, q, 3 + 2 * s) for s in range(4)],
            [torch.randn(q) for _ in range(4)], torch.randn(q, c), torch.randn(q), torch.randn(c, q),
            torch.randn(c))


@pytest.mark.parametrize("impl", list(OPS))
def test_psa_under_autocast_runs_in_bf16(impl):
    op = OPS[impl]
    x, ws, bs, f1w, f1b, f2w, f2b = psa_args()
    mask = torch.rand(3, 5) > 0.3
    with pytest.raises(TypeError, match="expected dtype torch.bfloat16"):   # outside autocast mixed dtypes are an error
        op.psa(x, ws, bs, f1w, f1b, f2w, f2b, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op.psa(x, ws, bs, f1w, f1b, f2w, f2b, mask)
        pooled = op.psa_pool(x, ws, bs, f1w, f1b, f2w, f2b, frame_mask=mask)
    bf = lambda t: [w.bfloat16() for w in t]  # noqa: E731
    want = op.psa(x, bf(ws), bf(bs), f1w.bfloat16(), f1b.bfloat16(), f2w.bfloat16(), f2b.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and pooled.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", list(OPS))
def test_attention_under_autocast_casts_inputs(impl):
    op = OPS[impl]
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    mask = torch.rand(2, 5) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op.attention(q, k.bfloat16(), v, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, op.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask))


@pytest.mark.parametrize("impl", list(OPS))
def test_supcon_under_autocast_accumulates_in_fp32(impl):
    op = OPS[impl]
    z = torch.randn(40, 16)
    labels = torch.randint(0, 4, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op.supcon_hard_negative_loss(z, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, op.supcon_hard_negative_loss(z, labels))


@pytest.mark.parametrize("model_cls", [reference.Model, mcncl_fast.Model])
def test_model_trains_under_bf16_autocast(model_cls):
    cfg = mcncl_fast.ModelConfig(**TINY)
    model = model_cls(cfg)
    batch = make_batch(cfg=cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
