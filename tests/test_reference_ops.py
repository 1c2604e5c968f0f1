"""The reference ops against independent, straightforward formulations written here."""
import math

import pytest
import torch
import torch.nn.functional as F

from mcncl_fast.reference import ops
from tests.helpers import supcon_by_loop


# ----------------------------------------------------------------- SupCon
@pytest.mark.parametrize("n,classes,hard_ratio", [(12, 3, 0.3), (25, 5, 0.01), (9, 2, 1.0), (30, 7, 0.5)])
def test_supcon_matches_per_anchor_loop(n, classes, hard_ratio):
    z = torch.randn(n, 6, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,))
    got = ops.supcon_hard_negative_loss(z, labels, temperature=0.1, hard_ratio=hard_ratio)
    assert ops.supcon_hard_negative_loss(z.half(), labels).dtype == torch.float32
    assert got.item() == pytest.approx(supcon_by_loop(z, labels, 0.1, hard_ratio), rel=1e-5)


def test_supcon_ties_at_threshold_are_all_included():
    # anchor 0 (class 0) has negatives 2, 3, 4 that are exact duplicates: all tie at the threshold
    base = torch.randn(4, 8, dtype=torch.float64)
    z = torch.stack([base[0], base[0] + 0.1 * base[1], base[2], base[2], base[2], base[3], -base[0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    for ratio in (0.01, 0.3, 0.6):
        got = ops.supcon_hard_negative_loss(z, labels, temperature=0.2, hard_ratio=ratio)
        assert got.item() == pytest.approx(supcon_by_loop(z, labels, 0.2, ratio), rel=1e-5)
    # with a tie, including one copy or all three gives different losses: the loop includes all
    one_copy = ops.supcon_hard_negative_loss(z[[0, 1, 2, 5, 6]], labels[[0, 1, 2, 5, 6]], 0.2, 0.01)
    assert abs(one_copy.item() - ops.supcon_hard_negative_loss(z, labels, 0.2, 0.01).item()) > 1e-4


def test_supcon_single_class_is_zero_with_zero_grad():
    z = torch.randn(10, 4, requires_grad=True)
    loss = ops.supcon_hard_negative_loss(z, torch.zeros(10, dtype=torch.long))
    loss.backward()
    # one class: no negatives, denominator = positives only; per-anchor loss is log(sum)-mean > 0
    assert loss.item() == pytest.approx(supcon_by_loop(z.detach(), torch.zeros(10, dtype=torch.long), 0.07, 0.3),
                                        rel=1e-5)
    assert torch.isfinite(z.grad).all()


def test_supcon_no_positive_anywhere_is_zero():
    z = torch.randn(5, 4, requires_grad=True)
    loss = ops.supcon_hard_negative_loss(z, torch.arange(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_supcon_class_with_one_member_is_not_an_anchor_but_a_negative():
    z = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])   # class 2 has one member
    got = ops.supcon_hard_negative_loss(z, labels, 0.1, 1.0)
    assert got.item() == pytest.approx(supcon_by_loop(z, labels, 0.1, 1.0), rel=1e-5)


def test_supcon_stacked_modalities_is_per_modality():
    z = torch.randn(3, 20, 8)
    labels = torch.randint(0, 4, (20,))
    stacked = ops.supcon_hard_negative_loss(z, labels)
    assert stacked.shape == (3,)
    for m in range(3):
        assert stacked[m].item() == pytest.approx(ops.supcon_hard_negative_loss(z[m], labels).item(), rel=1e-6)


def test_hard_negative_counts():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    # negatives per class: 7, 8, 5 -> ceil(0.3 n): 3, 3, 2
    assert ops.hard_negative_counts(labels, 0.3).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert ops.hard_negative_counts(labels, 1.0).tolist() == [7, 7, 7, 8, 8, 5, 5, 5, 5, 5]
    assert ops.hard_negative_counts(labels, 0.01).tolist() == [1] * 10
    assert ops.hard_negative_counts(torch.zeros(4, dtype=torch.long), 0.3).tolist() == [0] * 4


def test_label_statistics_with_ignored_rows_and_num_classes():
    labels = torch.tensor([2, 0, -100, 2, 1, 0, -100, 2])
    # valid rows: 6; class sizes 0: 2, 1: 1, 2: 3 -> negatives 4, 5, 3
    for num_classes in (None, 3, 5):
        stats = ops.label_statistics(labels, 0.3, num_classes=num_classes)
        if num_classes is not None:
            assert stats.class_ids.tolist() == [2, 0, -1, 2, 1, 0, -1, 2]
        assert (stats.class_ids == -1).tolist() == (labels == -100).tolist()
        assert stats.positives.tolist() == [2, 1, 0, 2, 0, 1, 0, 2]
        assert stats.negatives.tolist() == [3, 4, 0, 3, 5, 4, 0, 3]
        assert stats.k.tolist() == [1, 2, 0, 1, 2, 2, 0, 1]
    # ignore_index=2: valid rows 0, -100, 1, 0, -100 -> classes of sizes 2, 2, 1: negatives 3, 3, 4
    assert ops.hard_negative_counts(labels, 1.0, ignore_index=2).tolist() == [0, 3, 3, 0, 4, 3, 3, 0]


def test_supcon_ignored_rows_equal_dropped_rows():
    z = torch.randn(2, 30, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,))
    labels[[0, 7, 8, 29]] = -100
    keep = labels != -100
    za = z.clone().requires_grad_(True)
    zb = z.clone().requires_grad_(True)
    got = ops.supcon_hard_negative_loss(za, labels, 0.1, 0.3)
    want = ops.supcon_hard_negative_loss(zb[:, keep], labels[keep], 0.1, 0.3)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(za.grad, zb.grad)
    assert torch.equal(za.grad[:, ~keep], torch.zeros_like(za.grad[:, ~keep]))
    torch.testing.assert_close(ops.supcon_hard_negative_loss(z, labels, 0.1, 0.3, num_classes=4), got.detach())
    labels[3] = 4
    with pytest.raises(ValueError, match="labels: expected values in"):
        ops.supcon_hard_negative_loss(z, labels, num_classes=4)


def test_supcon_tie_tolerance_is_applied_to_the_threshold():
    """Anchor 0's negatives have s = 0.5 (the k = 1 threshold), 0.5 - 2^-20 (within the tolerance
    2^-18: tied, hard), 0.5 - 2^-16 (beyond it: not hard) and 0.1: exact values (normalize=False)."""
    sims = [0.5, 0.5 - 2.0 ** -20, 0.5 - 2.0 ** -16, 0.1]
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]] + [[s, 0.5] for s in sims], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    got = ops.supcon_hard_negative_loss(z, labels, 0.1, 0.01, normalize=False)
    # anchors 0 and 1 (identical): D = exp(1/tau) + exp(s_0/tau) + exp(s_1/tau); log D - 1/tau
    tau = 0.1
    want = math.log(math.exp(1 / tau) + math.exp(sims[0] / tau) + math.exp(sims[1] / tau)) - 1 / tau
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert got.item() == pytest.approx(supcon_by_loop(z, labels, tau, 0.01, normalize=False), rel=1e-12)


# -------------------------------------------------------------- attention
@pytest.mark.parametrize("lq,lk", [(5, 7), (1, 9), (6, 1), (17, 17)])
def test_attention_matches_sdpa_with_mask(lq, lk):
    b, h, dh = 3, 2, 8
    q, k, v = (torch.randn(b, h, length, dh, dtype=torch.float64) for length in (lq, lk, lk))
    mask = torch.rand(b, lk) > 0.4
    mask[:, 0] = True                         # every row has a key: SDPA is defined everywhere
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(ops.attention(q, k, v, mask), want)
    torch.testing.assert_close(ops.attention(q, k, v, None, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_attention_fully_masked_rows_are_zero_with_zero_grad():
    q, k, v = (torch.randn(2, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    out = ops.attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    want = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=mask[:1, None, None, :])
    torch.testing.assert_close(out[:1], want)


# -------------------------------------------------------------------- PSA
def psa_by_branches(x, weights, biases, fc1_w, fc1_b, fc2_w, fc2_b, frame_mask):
    """Row by row: only the valid frames are kept and the conv sees zeros beyond them."""
    n, length, c = x.shape
    out = torch.zeros_like(x)
    for r in range(n):
        valid = frame_mask[r]
        xr = torch.where(valid[:, None], x[r], torch.zeros_like(x[r])).T          # [C, L]
        ys = [F.conv1d(xr[None, s * c // 4:(s + 1) * c // 4], weights[s], biases[s], padding=(3 + 2 * s) // 2)[0]
              for s in range(4)]
        y = torch.cat(ys).T                                                       # [L, C]
        squeezed = y[valid].mean(0) if valid.any() else torch.zeros(c, dtype=x.dtype)
        gate = torch.sigmoid(fc2_w @ torch.relu(fc1_w @ squeezed + fc1_b) + fc2_b)
        out[r] = torch.where(valid[:, None], y * gate, torch.zeros_like(y))
    return out


def psa_params(c, dtype=torch.float64, requires_grad=False):
    q = c // 4
    ws = [torch.randn(q, q, 3 + 2 * s, dtype=dtype, requires_grad=requires_grad) for s in range(4)]
    bs = [torch.randn(q, dtype=dtype, requires_grad=requires_grad) for _ in range(4)]
    fc = [torch.randn(q, c, dtype=dtype), torch.randn(q, dtype=dtype), torch.randn(c, q, dtype=dtype),
          torch.randn(c, dtype=dtype)]
    return ws, bs, [t.requires_grad_(requires_grad) for t in fc]


@pytest.mark.parametrize("n,length,c", [(3, 7, 16), (2, 1, 8), (4, 12, 32)])
def test_psa_matches_per_branch_conv(n, length, c):
    x = torch.randn(n, length, c, dtype=torch.float64)
    mask = torch.rand(n, length) > 0.3
    mask[0] = False                            # a fully padded row
    ws, bs, fc = psa_params(c)
    got = ops.psa(x, ws, bs, *fc, frame_mask=mask)
    torch.testing.assert_close(got, psa_by_branches(x, ws, bs, *fc, mask))
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    pooled = ops.psa_pool(x, ws, bs, *fc, frame_mask=mask)
    want = torch.stack([got[r][mask[r]].mean(0) if mask[r].any() else torch.zeros(c, dtype=x.dtype)
                        for r in range(n)])
    torch.testing.assert_close(pooled, want)


def test_psa_default_mask_is_all_valid():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ws, bs, fc = psa_params(16)
    torch.testing.assert_close(ops.psa(x, ws, bs, *fc),
                               ops.psa(x, ws, bs, *fc, frame_mask=torch.ones(2, 5, dtype=torch.bool)))


# -------------------------------------------------------------- gradcheck
def test_gradcheck_supcon():
    z = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0])
    assert torch.autograd.gradcheck(lambda t: ops.supcon_hard_negative_loss(t, labels, 0.5, 0.4), (z,))


def test_gradcheck_attention():
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    assert torch.autograd.gradcheck(lambda *t: ops.attention(*t, mask), (q, k, v))


def test_gradcheck_psa():
    x = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    ws, bs, fc = psa_params(8, requires_grad=True)
    inputs = (x, *ws, *bs, *fc)
    assert torch.autograd.gradcheck(
        lambda x, w0, w1, w2, w3, b0, b1, b2, b3, f1w, f1b, f2w, f2b:
        ops.psa(x, [w0, w1, w2, w3], [b0, b1, b2, b3], f1w, f1b, f2w, f2b, mask), inputs)


# ------------------------------------------------------------- bad inputs
def test_reference_ops_reject_bad_input():
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match="labels"):
        ops.supcon_hard_negative_loss(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        ops.supcon_hard_negative_loss(z, torch.zeros(6))
    with pytest.raises(ValueError, match="temperature"):
        ops.supcon_hard_negative_loss(z, torch.zeros(6, dtype=torch.long), temperature=-1.0)
    with pytest.raises(ValueError, match="hard_ratio"):
        ops.supcon_hard_negative_loss(z, torch.zeros(6, dtype=torch.long), hard_ratio=0.0)
    with pytest.raises(ValueError, match="z"):
        ops.supcon_hard_negative_loss(torch.randn(6), torch.zeros(6, dtype=torch.long))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="k"):
        ops.attention(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(TypeError, match="key_padding_mask"):
        ops.attention(q, q, q, torch.ones(1, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops.attention(q, q, q, torch.ones(2, 3, dtype=torch.bool))
    ws, bs, fc = psa_params(16, dtype=torch.float32)
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.psa(torch.randn(2, 3, 18), ws, bs, *fc)
    with pytest.raises(ValueError, match=r"weights\[2\]"):
        ops.psa(torch.randn(2, 3, 16), ws[:2] + [ws[3], ws[3]], bs, *fc)
    with pytest.raises(ValueError, match="frame_mask"):
        ops.psa(torch.randn(2, 3, 16), ws, bs, *fc, frame_mask=torch.ones(2, 4, dtype=torch.bool))


def test_attention_grouped_is_a_loop_of_singles():
    q = torch.randn(3, 2, 2, 5, 8, dtype=torch.float64)
    k = torch.randn(3, 2, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(3, 2, 2, 7, 8, dtype=torch.float64)
    shared = torch.rand(2, 7) > 0.4
    per_group = torch.rand(3, 2, 7) > 0.4
    got = ops.attention_grouped(q, k, v, shared)
    got_g = ops.attention_grouped(q, k, v, per_group)
    for g in range(3):
        torch.testing.assert_close(got[g], ops.attention(q[g], k[g], v[g], shared))
        torch.testing.assert_close(got_g[g], ops.attention(q[g], k[g], v[g], per_group[g]))
