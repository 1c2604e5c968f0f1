"""SupCon: ties that survive rounding, ignored rows, and no host-device sync (DESIGN.md §4.3).

Ties: two implementations compute s_ij with different instructions and summation orders, so
duplicated embeddings can give similarities an ulp apart. The rule (negatives within the tie
tolerance of t_i count as tied) makes the reference, the fast forward and the backward agree; the
oracle is tests.helpers.supcon_by_loop (float64, one dot product per pair, so copies are equal).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcncl_fast import ops
from mcncl_fast.ops import supcon as supcon_op
from mcncl_fast.reference import ops as reference_ops
from benchmarks.device_ops import DeviceOps
from tests.helpers import INTERPRET, spy_host_reads, assert_close_rel, rel_error, supcon_by_loop
from tests.test_supcon_fast import PATH_DEVICES, PATHS, compare, loss_and_grad


def duplicated_case(n, d, classes, copies_of, seed, dtype=torch.float32):
    """n rows drawn from `copies_of` distinct random vectors: every anchor's negatives hold copies,
    so the k-th largest negative is tied with its copies almost always. d is odd on purpose: BLAS
    kernels then take edge paths that round copies differently."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(copies_of, d, generator=gen, dtype=torch.float64)
    z = base[torch.randint(0, copies_of, (n,), generator=gen)]
    labels = torch.randint(0, classes, (n,), generator=gen)
    return z.to(dtype), labels


def kernel_input(z, normalize=True):
    """The z' the fast path computes on (float32, or 16-bit tiles on CUDA), as float64."""
    return supcon_op.normalized_embeddings(z.unsqueeze(0), normalize)[0].double().cpu()


def assert_matches_oracle(loss, z, labels, tau, ratio, normalize=True):
    want = supcon_by_loop(kernel_input(z, normalize), labels.cpu(), tau, ratio, normalize=False)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.7])
def test_duplicated_embeddings_at_the_threshold(use_path, path, device, dtype, ratio):
    use_path(path, device)
    z, labels = duplicated_case(45, 37, 4, 9, seed=int(ratio * 100), dtype=dtype)
    z, labels = z.to(device), labels.to(device)
    fast_loss, fast_grad = loss_and_grad(ops.supcon_hard_negative_loss, z, labels, temperature=0.2,
                                         hard_ratio=ratio)
    assert_matches_oracle(fast_loss, z, labels, 0.2, ratio)
    ref_loss, ref_grad = loss_and_grad(reference_ops.supcon_hard_negative_loss, z.float(), labels,
                                       temperature=0.2, hard_ratio=ratio)
    assert_matches_oracle(ref_loss, z.float(), labels, 0.2, ratio)
    tol_key = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32   # the gradient comes back in bf16
    assert_close_rel(fast_grad.float(), ref_grad, tol_key, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_ties_do_not_depend_on_blas_rounding(dtype):
    z, labels = duplicated_case(60, 37, 5, 11, seed=3, dtype=dtype)
    for ratio in (0.01, 0.3, 0.6):
        assert_matches_oracle(reference_ops.supcon_hard_negative_loss(z, labels, 0.2, ratio), z, labels, 0.2, ratio)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_backward_classification_survives_perturbed_similarities(use_path, path, device):
    """Adversarial: the backward recomputes s_ij from a z' whose elements moved by +-1 ulp (copies
    moved differently, so tied copies now differ in the last bits); the gradient must not notice."""
    use_path(path, device)
    z, labels = duplicated_case(50, 33, 3, 7, seed=5)
    zn = supcon_op.normalized_embeddings(z.unsqueeze(0).to(device), True)
    labels = labels.to(device)
    _, theta, logd, npos, ids = supcon_op._supcon_fwd(zn, labels, 0.1, 0.3, -100, None)
    gen = torch.Generator().manual_seed(0)
    up = torch.rand(zn.shape, generator=gen).to(device) < 0.5
    perturbed = torch.where(up, torch.nextafter(zn, torch.full_like(zn, 2.0)),
                            torch.nextafter(zn, torch.full_like(zn, -2.0)))
    assert not torch.equal(perturbed, zn)
    g = torch.ones(1, device=device)
    exact = supcon_op._supcon_bwd(g, zn, ids, theta, logd, npos, 0.1)
    moved = supcon_op._supcon_bwd(g, perturbed, ids, theta, logd, npos, 0.1)
    assert rel_error(moved, exact) < 1e-5


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 40), d=st.integers(2, 19), copies=st.integers(1, 8), classes=st.integers(1, 5),
       ratio=st.floats(0.01, 1.0), path=st.sampled_from([p.values[0] for p in PATHS]), seed=st.integers(0, 999))
def test_fuzz_ties_against_the_oracle(monkeypatch, n, d, copies, classes, ratio, path, seed):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
    z, labels = duplicated_case(n, d, classes, copies, seed)
    assert_matches_oracle(ops.supcon_hard_negative_loss(z, labels, 0.2, ratio), z, labels, 0.2, ratio)


# ------------------------------------------------------------------ ignored rows
@pytest.mark.parametrize("path,device", PATH_DEVICES)
@pytest.mark.parametrize("num_classes", [None, 6])
def test_ignored_rows_equal_dropped_rows(use_path, path, device, num_classes):
    use_path(path, device)
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(3, 70, 24, generator=gen).to(device)
    labels = torch.randint(0, 6, (70,), generator=gen)
    labels[torch.randperm(70, generator=gen)[:20]] = -100
    labels = labels.to(device)
    keep = labels != -100
    loss, grad = loss_and_grad(ops.supcon_hard_negative_loss, z, labels, num_classes=num_classes)
    kept_loss, kept_grad = loss_and_grad(ops.supcon_hard_negative_loss, z[:, keep], labels[keep])
    assert_close_rel(loss, kept_loss, torch.float32, "loss")
    assert_close_rel(grad[:, keep], kept_grad, torch.float32, "grad")
    assert torch.equal(grad[:, ~keep], torch.zeros_like(grad[:, ~keep]))
    compare(z, labels, torch.float32, "vs reference", num_classes=num_classes)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_every_row_ignored_gives_zero(use_path, path, device):
    use_path(path, device)
    z = torch.randn(2, 9, 8, device=device)
    loss, grad = loss_and_grad(ops.supcon_hard_negative_loss, z, torch.full((9,), -1, device=device),
                               ignore_index=-1, num_classes=3)
    assert torch.equal(loss, torch.zeros(2, device=device)) and torch.equal(grad, torch.zeros_like(grad))


def test_bad_num_classes_and_ignore_index():
    z, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, -100, 1])
    with pytest.raises(ValueError, match="num_classes"):
        ops.supcon_hard_negative_loss(z, labels, num_classes=0)
    with pytest.raises(ValueError, match="ignore_index: must lie outside"):
        ops.supcon_hard_negative_loss(z, labels, ignore_index=1, num_classes=3)
    with pytest.raises(TypeError, match="ignore_index"):
        ops.supcon_hard_negative_loss(z, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 2\)"):
        ops.supcon_hard_negative_loss(z, labels, num_classes=2)


# ------------------------------------------------------------------ no host-device sync
@pytest.mark.skipif(not INTERPRET, reason="the Triton path runs through the interpreter here")
def test_no_host_sync_with_num_classes(monkeypatch):
    """The path CUDA tensors take (Triton forward, extension backward), with the class count known:
    no sync op is dispatched and no tensor is read on the host."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    host_reads = spy_host_reads(monkeypatch)
    z = torch.randn(3, 40, 16, requires_grad=True)
    labels = torch.randint(0, 5, (40,))
    labels[::6] = -100
    with DeviceOps() as counter:
        loss = ops.supcon_hard_negative_loss(z, labels, num_classes=5)
        loss.sum().backward()
    assert counter.triton >= 1 and counter.aten > 20          # the recorder saw the op's work
    assert counter.syncs == [] and host_reads == [], (counter.syncs, host_reads)
    monkeypatch.undo()
    with DeviceOps() as counter:     # without the class count the op needs torch.unique: it shows
        ops.supcon_hard_negative_loss(z, labels)
    assert counter.syncs
