"""The device prefetcher (mcncl_fast/prefetch.py): every batch once, in order, structure kept; on CUDA the
copy runs on a side stream and must land intact before the step (eager or a CUDA-graph replay) reads it."""
from collections import namedtuple

import pytest
import torch

import mcncl_fast
from mcncl_fast.prefetch import DevicePrefetcher, to_device
from mcncl_fast.step import CudaGraphStep, TrainStep, make_optimizer

Pair = namedtuple("Pair", "left right")


def nested_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(3, 4, generator=g), "meta": {"ids": (k, f"dialogue-{k}"), "lengths": [k, k + 1]},
             "pair": Pair(torch.randint(0, 9, (2,), generator=g), None), "n": k} for k in range(n)]


def assert_same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.device.type == "cpu" or got.is_cuda
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same(a, b)
    else:
        assert got == expected


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_every_batch_once_in_order_with_its_structure_on_cpu(n):
    batches = nested_batches(n)
    got = list(DevicePrefetcher(batches, "cpu"))
    assert len(got) == n                                     # the last batch is not lost
    for out, batch in zip(got, batches):
        assert_same(out, batch)
    assert [out["n"] for out in got] == list(range(n))


def test_cpu_pass_through_applies_move_and_creates_no_stream(monkeypatch):
    def no_stream(*args, **kwargs):
        raise AssertionError("a CUDA stream on a CPU device")
    monkeypatch.setattr(torch.cuda, "Stream", no_stream)
    seen = []
    prefetcher = DevicePrefetcher([1, 2, 3], torch.device("cpu"), move=lambda b: seen.append(b) or b * 10)
    assert len(prefetcher) == 3
    assert list(prefetcher) == [10, 20, 30] and seen == [1, 2, 3]


def test_move_is_lazy_one_batch_at_a_time_on_cpu():
    pulled = []

    def source():
        for k in range(3):
            pulled.append(k)
            yield k
    it = iter(DevicePrefetcher(source(), "cpu", move=lambda b: b))
    assert next(it) == 0 and pulled == [0]


def test_a_loader_exception_propagates_after_the_batches_before_it():
    def failing():
        yield {"x": torch.ones(2)}
        yield {"x": torch.full((2,), 2.0)}
        raise OSError("disk gone")
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for batch in DevicePrefetcher(failing(), "cpu"):
            got.append(float(batch["x"][0]))
    assert got == [1.0, 2.0]


def test_to_device_keeps_non_tensor_values():
    batch = {"a": [torch.zeros(1), "text", 3], "b": (None, 1.5)}
    assert_same(to_device(batch, torch.device("cpu")), batch)


# ----------------------------------------------------------------------------- CUDA
def overwritten_pinned_batches(n, shape=(256, 1024)):
    """One pinned buffer refilled in place for each batch (as a staging producer does); yields the buffer."""
    buffer = torch.empty(shape, pin_memory=True)
    for k in range(n):
        buffer.fill_(float(k))
        yield {"x": buffer, "k": k}


@pytest.mark.gpu
def test_cuda_values_arrive_intact_while_the_producer_overwrites_its_pinned_buffer():
    device = torch.device("cuda")
    seen = []
    for batch in DevicePrefetcher(overwritten_pinned_batches(12), device):
        assert batch["x"].is_cuda
        torch.cuda._sleep(2_000_000)                   # a long step: the next copy overlaps it
        seen.append((batch["k"], batch["x"].min().item(), batch["x"].max().item()))
    assert seen == [(k, float(k), float(k)) for k in range(12)]


def _losses(graphs, prefetch, batches, device):
    torch.manual_seed(0)
    cfg = mcncl_fast.ModelConfig(text_dim=8, audio_dim=6, visual_dim=5, d_model=32, num_layers=1, num_heads=2,
                                 proj_dim=8, dropout=0.0)
    model = mcncl_fast.Model(cfg).to(device)
    optimizer = make_optimizer(model, 1e-3, 1e-4, capturable=graphs)
    step = TrainStep(lambda b: model(**b).loss, model, optimizer, grad_clip=1.0)
    step = CudaGraphStep(step) if graphs else step
    source = DevicePrefetcher(batches, device) if prefetch else (to_device(b, device) for b in batches)
    losses = []
    for batch in source:
        losses.append(step(batch)[0].clone())           # a replay overwrites its output at the next step
    return torch.stack(losses).cpu()


@pytest.mark.gpu
def test_cuda_eager_and_graph_steps_give_the_same_losses_with_and_without_the_prefetcher():
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    b, s, frames = 4, 6, 3
    batches = [dict(text=torch.randn(b, s, 8, generator=g), audio=torch.randn(b, s, 6, generator=g),
                    visual=torch.randn(b, s, frames, 5, generator=g),
                    utterance_mask=torch.ones(b, s, dtype=torch.bool),
                    frame_mask=torch.ones(b, s, frames, dtype=torch.bool),
                    labels=torch.randint(0, 7, (b, s), generator=g)) for _ in range(6)]
    batches = [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]
    eager = _losses(False, False, batches, device)
    assert torch.isfinite(eager).all() and len(set(eager.tolist())) > 1
    for graphs, prefetch in ((False, True), (True, False), (True, True)):
        torch.testing.assert_close(_losses(graphs, prefetch, batches, device), eager, rtol=1e-4, atol=1e-5,
                                   msg=f"graphs={graphs} prefetch={prefetch}")
