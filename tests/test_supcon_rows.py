"""SupCon on a range of anchor rows against all columns (what each rank computes under data
parallelism, mcncl_fast.distributed): ranges concatenate to the whole, and the work falls with the
range."""
import pytest
import torch
import torch.nn.functional as F
from triton.runtime import interpreter

from mcncl_fast.ops import supcon as supcon_op
from mcncl_fast.reference.ops import label_statistics
from tests.helpers import INTERPRET, rel_error
from tests.test_supcon_fast import PATH_DEVICES


def case(n=203, d=24, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(2, n, d, generator=gen), dim=-1)
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[::9] = -100
    return z, labels


@pytest.mark.parametrize("path,device", PATH_DEVICES)
def test_row_ranges_concatenate_to_the_whole(use_path, path, device):
    use_path(path, device)
    z, labels = case()
    z, labels = z.to(device), labels.to(device)
    stats = label_statistics(labels, 0.3, num_classes=5)
    whole = supcon_op.forward_rows(z, stats, 0.1)
    bounds = [0, 70, 71, 150, 203]         # uneven shards, one of a single row
    parts = [supcon_op.forward_rows(z, stats, 0.1, a, b - a) for a, b in zip(bounds, bounds[1:])]
    for name, full, pieces in zip(("theta", "logd", "possum"), whole, zip(*parts)):
        joined = torch.cat(pieces, dim=1)
        finite = torch.isfinite(full)      # theta is +-inf for ignored rows / all-hard rows
        assert torch.equal(joined[~finite], full[~finite]), name
        assert rel_error(joined[finite], full[finite]) < 1e-6, name   # BLAS blocks may round differently
    theta, logd, _ = whole
    ids, npos = stats.class_ids.to(torch.int32), stats.positives.float()
    g = torch.tensor([1.0, -0.5])
    grad = supcon_op.backward_rows(g, z, ids, theta, logd, npos, 0.1)
    pieces = [supcon_op.backward_rows(g, z, ids, theta, logd, npos, 0.1, a, b - a) for a, b in zip(bounds, bounds[1:])]
    assert rel_error(torch.cat(pieces, dim=1), grad) < 1e-6
    assert supcon_op.backward_rows(g, z, ids, theta, logd, npos, 0.1, 5, 0).shape == (2, 0, 24)
    with pytest.raises(ValueError, match="row_start, row_count"):
        supcon_op.forward_rows(z, stats, 0.1, 150, 60)


@pytest.mark.skipif(not INTERPRET, reason="counts the Triton kernel's tl.dot work through the interpreter")
def test_forward_work_falls_with_the_row_range(monkeypatch):
    """Multiply-adds of every tl.dot the forward issues, for half the anchors vs all of them. The
    second half of the rows repeats the first (same labels), so both halves need the same passes."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, labels = case(n=256, d=16, seed=1)
    z = torch.cat([z, z], dim=1)
    labels = torch.cat([labels, labels])
    stats = label_statistics(labels, 0.3, num_classes=5)
    macs = []
    original = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *args, **kwargs):
        macs.append(a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1])
        return original(self, a, b, *args, **kwargs)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)

    def work(*rows):
        macs.clear()
        supcon_op.forward_rows(z, stats, 0.1, *rows)
        return sum(macs)
    whole, half = work(0, 512), work(0, 256)
    assert whole > 0 and half * 2 == whole, (half, whole)
