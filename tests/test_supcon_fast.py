"""Fast hard-negative SupCon loss vs the reference (DESIGN.md §4.3, §6).

Two fast paths are checked against mcncl_fast.reference.ops, loss and gradient:
  "triton": the Triton forward (interpreter on CPU, compiled on CUDA with -m gpu) + extension backward
  "cpu":    the chunked PyTorch forward + host C++ backward (plain CPU, TRITON_INTERPRET unset)
16-bit: float16 through the interpreter (it has no bfloat16 arithmetic), bfloat16 and float16 on
the CPU path and on CUDA.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcncl_fast import ops
from mcncl_fast.ops import supcon as supcon_op
from mcncl_fast.reference import ops as reference_ops
from tests.helpers import INTERPRET, assert_close_rel, kernel_devices, rel_error

PATHS = ([pytest.param("triton", id="triton")] if INTERPRET else []) + [pytest.param("cpu", id="cpu")]


def _paths_and_devices():
    out = [pytest.param("cpu", "cpu", id="cpu-chunked")]
    for dev in kernel_devices():
        if isinstance(dev, str):
            out.append(pytest.param("triton", dev, id=f"triton-{dev}"))
        else:
            out.append(pytest.param("triton", dev.values[0], id="triton-cuda", marks=dev.marks))
    return out


PATH_DEVICES = _paths_and_devices()


def loss_and_grad(fn, z, labels, **kw):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, labels, **kw)
    weights = torch.arange(1, loss.numel() + 1, dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * weights).sum(), z)
    return loss.detach(), grad


def compare(z, labels, dtype_key, what="", **kw):
    fast_loss, fast_grad = loss_and_grad(ops.supcon_hard_negative_loss, z, labels, **kw)
    ref_loss, ref_grad = loss_and_grad(reference_ops.supcon_hard_negative_loss, z, labels, **kw)
    assert fast_loss.dtype == torch.float32 and fast_loss.shape == ref_loss.shape
    assert fast_grad.dtype == z.dtype
    assert_close_rel(fast_loss, ref_loss, dtype_key, f"{what} loss")
    assert_close_rel(fast_grad, ref_grad, dtype_key, f"{what} grad")
    return fast_loss, fast_grad


def random_case(m, n, d, classes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(max(m, 1), n, d, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    z = z[0] if m == 0 else z
    return z.to(device=device, dtype=dtype), labels.to(device)


# (M, N, D, classes, hard_ratio); M = 0 means a 2-D z [N, D]
FP32_CASES = [
    (0, 1, 16, 2, 0.3), (0, 2, 16, 2, 0.3), (1, 2, 16, 1, 0.3), (3, 37, 16, 3, 0.3), (0, 37, 200, 20, 0.01),
    (3, 37, 128, 2, 1.0), (1, 300, 128, 5, 0.3), (0, 300, 16, 2, 1.0), (1, 300, 200, 11, 0.01),
]


@pytest.mark.parametrize("path,device", PATH_DEVICES)
@pytest.mark.parametrize("m,n,d,classes,hard_ratio", FP32_CASES, ids=lambda v: str(v))
def test_parity_fp32(use_path, path, device, m, n, d, classes, hard_ratio):
    use_path(path, device)
    z, labels = random_case(m, n, d, classes, device)
    compare(z, labels, torch.float32, f"{path} M{m} N{n} D{d}", hard_ratio=hard_ratio)


@pytest.mark.slow
@pytest.mark.parametrize("path,device", PATH_DEVICES)
@pytest.mark.parametrize("m,n", [(3, 300), (1, 1000)], ids=str)
def test_parity_fp32_large(use_path, path, device, m, n):
    use_path(path, device)
    z, labels = random_case(m, n, 128, 7, device, seed=1)
    compare(z, labels, torch.float32, f"M{m} N{n}")


def _half_cases():
    cases = [pytest.param("cpu", "cpu", torch.bfloat16, id="cpu-bf16"),
             pytest.param("cpu", "cpu", torch.float16, id="cpu-fp16")]
    for path, device in [(p.values[0], p.values[1]) for p in PATH_DEVICES if p.values[0] == "triton"]:
        if device == "cpu":
            cases.append(pytest.param("triton", "cpu", torch.float16, id="triton-cpu-fp16"))
            # bfloat16 CPU tensors run the interpreter in float32 (no bfloat16 arithmetic there)
            cases.append(pytest.param("triton", "cpu", torch.bfloat16, id="triton-cpu-bf16"))
        else:
            for dt in (torch.bfloat16, torch.float16):
                cases.append(pytest.param("triton", "cuda", dt, id=f"triton-cuda-{dt}", marks=pytest.mark.gpu))
    return cases


@pytest.mark.parametrize("path,device,dtype", _half_cases())
@pytest.mark.parametrize("m,n,d,classes", [(1, 300, 128, 7), (3, 37, 200, 3)], ids=str)
def test_parity_16bit(use_path, path, device, dtype, m, n, d, classes):
    use_path(path, device)
    z, labels = random_case(m, n, d, classes, device, dtype)
    compare(z, labels, dtype, f"{path} {dtype}")


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_single_class(use_path, path, device):
    """One class: no negatives (k = 0), D_i holds the positives only; by §4.3 the loss is not 0."""
    use_path(path, device)
    z = torch.randn(2, 20, 16, device=device)
    labels = torch.full((20,), 3, device=device)
    loss, grad = compare(z, labels, torch.float32)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_single_sample_gives_zero_loss_and_grad(use_path, path, device):
    use_path(path, device)
    z = torch.randn(3, 1, 16, device=device)
    loss, grad = compare(z, torch.zeros(1, dtype=torch.long, device=device), torch.float32)
    assert torch.equal(loss, torch.zeros(3, device=device))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_no_positive_anywhere_gives_zero(use_path, path, device):
    use_path(path, device)
    z = torch.randn(9, 8, device=device)
    loss, grad = compare(z, torch.arange(9, device=device), torch.float32)   # every class has one member
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_class_with_one_member(use_path, path, device):
    use_path(path, device)
    z, labels = random_case(3, 50, 16, 3, device, seed=3)
    labels[7] = 99            # a singleton: an anchor without positives that is still everyone's negative
    compare(z, labels, torch.float32)


def _tie_case(device):
    """Exact ties at the threshold: unit basis vectors (similarities exactly 0 or 1), duplicated."""
    d = 8
    basis = torch.eye(d)
    # class 0: 6 anchors all equal to e0; negatives: 5 copies of e0 (s = 1) and 9 others (s = 0)
    rows = [basis[0]] * 6 + [basis[0]] * 5 + [basis[1 + i % 7] for i in range(9)]
    labels = [0] * 6 + [1] * 5 + [2 + i % 3 for i in range(9)]
    z = torch.stack(rows) * 3.0
    return z.to(device), torch.tensor(labels, device=device)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
@pytest.mark.parametrize("hard_ratio", [0.01, 0.3, 0.5, 1.0])
def test_exact_ties_at_threshold(use_path, path, device, hard_ratio):
    use_path(path, device)
    z, labels = _tie_case(device)
    # the class-0 anchors have 14 negatives: 5 with s = 1, 9 with s = 0; k = ceil(r * 14)
    k = reference_ops.hard_negative_counts(labels, hard_ratio)[0].item()
    sims = F.normalize(z.float(), dim=-1) @ F.normalize(z.float(), dim=-1).T
    neg = sims[0][labels != 0].sort(descending=True).values
    threshold = neg[k - 1]
    assert (neg == threshold).sum() > 1, "the case must put ties at the threshold"
    compare(z, labels, torch.float32, f"ties r={hard_ratio}", hard_ratio=hard_ratio)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_ties_without_normalisation(use_path, path, device):
    use_path(path, device)
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-3, 4, (6, 16), generator=gen).float() / 4      # exact products and sums
    z = base[torch.randint(0, 6, (40,), generator=gen)]                  # many duplicated rows
    labels = torch.randint(0, 4, (40,), generator=gen)
    compare(z.to(device), labels.to(device), torch.float32, "ties, normalize=False", normalize=False,
            temperature=2.0)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_temperature_and_int32_labels(use_path, path, device):
    use_path(path, device)
    z, labels = random_case(2, 60, 24, 4, device, seed=7)
    compare(z, labels.int(), torch.float32, temperature=0.5, hard_ratio=0.7)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_labels_beyond_int32_and_negative(use_path, path, device):
    use_path(path, device)
    z, labels = random_case(2, 50, 16, 3, device, seed=9)
    # 2**32 + c would collide with c under an int32 cast
    labels = torch.tensor([-7, 2**32, 0], device=device)[labels]
    compare(z, labels, torch.float32)
    compare(z, labels.remainder(2**32), torch.float32)     # 2**32 -> 0 merges two classes: still parity


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_large_logits_without_normalisation(use_path, path, device):
    use_path(path, device)
    """Logits ~ 1e5: no overflow (row-max shift). The problem is ill-conditioned in float32 (one ulp
    of s ~ 1e4 moves exp(s / tau) by ~1%, in the reference too), so the gradient gets a loose bound."""
    z, labels = random_case(1, 40, 16, 3, device, seed=4)
    z = z * 30.0
    fast_loss, fast_grad = loss_and_grad(ops.supcon_hard_negative_loss, z, labels, normalize=False, temperature=0.05)
    ref_loss, ref_grad = loss_and_grad(reference_ops.supcon_hard_negative_loss, z, labels, normalize=False,
                                       temperature=0.05)
    assert torch.isfinite(fast_loss).all() and torch.isfinite(fast_grad).all()
    assert_close_rel(fast_loss, ref_loss, torch.float32, "loss")
    assert rel_error(fast_grad, ref_grad) < 5e-2


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_under_autocast(use_path, path, device):
    """Inside an autocast region the op keeps its own precision (same result as outside)."""
    use_path(path, device)
    z, labels = random_case(3, 50, 16, 3, device, seed=6)
    outside = loss_and_grad(ops.supcon_hard_negative_loss, z, labels)
    dtype = torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16
    with torch.autocast(torch.device(device).type, dtype=dtype):
        inside = loss_and_grad(ops.supcon_hard_negative_loss, z, labels)
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_non_contiguous_input(use_path, path, device):
    use_path(path, device)
    z = torch.randn(40, 2, 3, 16, device=device)[:, 1].transpose(0, 1)      # [3, 40, 16] strided
    labels = torch.randint(0, 4, (40,), device=device)
    assert not z.is_contiguous()
    compare(z, labels, torch.float32)


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_torch_compile_fullgraph(use_path, path, device):
    use_path(path, device)
    z, labels = random_case(3, 40, 16, 4, device, seed=2)

    def fn(x, y):
        return ops.supcon_hard_negative_loss(x * 2.0, y).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    fn(a, labels).backward()
    compiled(b, labels).backward()
    assert_close_rel(b.grad, a.grad, torch.float32, "compiled grad")
    assert rel_error(compiled(b, labels), fn(a, labels)) < 1e-6


def test_opcheck_custom_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = F.normalize(torch.randn(2, 12, 8), dim=-1).requires_grad_(True)
    labels = torch.randint(0, 3, (12,))
    for num_classes in (None, 3):
        torch.library.opcheck(supcon_op._supcon_fwd, (z, labels, 0.07, 0.3, -100, num_classes),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_reference_backend_env(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")
    z, labels = random_case(2, 30, 8, 3, "cpu")
    got = ops.supcon_hard_negative_loss(z, labels)
    assert torch.equal(got, reference_ops.supcon_hard_negative_loss(z, labels))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), d=st.integers(2, 20), m=st.integers(0, 2), classes=st.integers(1, 6),
       hard_ratio=st.floats(0.01, 1.0), normalize=st.booleans(), dup=st.booleans(),
       path=st.sampled_from([p.values[0] for p in PATHS]), seed=st.integers(0, 2**16))
def test_fuzz_against_reference(monkeypatch, n, d, m, classes, hard_ratio, normalize, dup, path, seed):
    # d >= 2: at d = 1 normalised rows are exactly +-1 and every true gradient is 0 (both sides give noise)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(max(m, 1), n, d, generator=gen)
    if dup:   # duplicated rows: exact ties
        z = z[:, torch.randint(0, max(1, n // 3), (n,), generator=gen)]
    z = z[0] if m == 0 else z
    labels = torch.randint(0, classes, (n,), generator=gen)
    kw = dict(hard_ratio=hard_ratio, normalize=normalize, temperature=0.07 if normalize else 1.0)
    fast_loss, fast_grad = loss_and_grad(ops.supcon_hard_negative_loss, z, labels, **kw)
    ref_loss, ref_grad = loss_and_grad(reference_ops.supcon_hard_negative_loss, z, labels, **kw)
    assert_close_rel(fast_loss, ref_loss, torch.float32, "fuzz loss")
    if ref_grad.norm() < 1e-4:
        # degenerate draws (e.g. all rows equal, one class) have a true gradient of 0: both sides are
        # rounding noise, so compare absolutely
        assert torch.isfinite(fast_grad).all() and (fast_grad - ref_grad).norm() < 1e-4
    else:
        assert_close_rel(fast_grad, ref_grad, torch.float32, "fuzz grad")


@pytest.mark.parametrize("bad,match,exc", [
    (dict(z=torch.randn(5)), "z: expected a 2-D or 3-D", ValueError),
    (dict(z=torch.randn(1, 1, 5, 4)), "z: expected a 2-D or 3-D", ValueError),
    (dict(z=torch.randint(0, 3, (5, 4))), "z: expected dtype", TypeError),
    (dict(labels=torch.zeros(5)), "labels: expected an integer", TypeError),
    (dict(labels=torch.zeros(4, dtype=torch.long)), "labels: expected shape", ValueError),
    (dict(labels=torch.zeros(5, dtype=torch.long, device="meta")), "labels: expected device", ValueError),
    (dict(labels=[0, 1, 2, 3, 4]), "labels: expected a torch.Tensor", TypeError),
    (dict(temperature=-0.1), "temperature", ValueError),
    (dict(temperature=0.0), "temperature", ValueError),
    (dict(temperature=math.inf), "temperature", ValueError),
    (dict(hard_ratio=0.0), "hard_ratio", ValueError),
    (dict(hard_ratio=1.5), "hard_ratio", ValueError),
])
def test_bad_inputs(bad, match, exc):
    args = dict(z=torch.randn(5, 4), labels=torch.zeros(5, dtype=torch.long), temperature=0.07, hard_ratio=0.3)
    args.update(bad)
    with pytest.raises(exc, match=match):
        ops.supcon_hard_negative_loss(**args)
