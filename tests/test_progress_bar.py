"""The training bar's loss moves during an epoch, refreshed by time and by steps, without a host read per step."""
import collections

import pytest
import torch

import mcncl_fast.train as train_module
from mcncl_fast.train import REFRESH_SECONDS, REFRESH_STEPS, TrainConfig, train

# a small synthetic run: batch 2 gives an epoch of more than REFRESH_STEPS steps
SMALL = dict(synthetic_scale=0.02, batch_size=2, model=dict(d_model=32, num_layers=1), epochs=1)
HOST_READS = ("item", "cpu", "tolist", "numpy", "__float__")


class FakeClock:
    def __init__(self, tick):
        self.now, self.tick, self.calls = 100.0, tick, 0

    def __call__(self):
        self.now += self.tick
        self.calls += 1
        return self.now


def run_epoch(tmp_path, monkeypatch, tick):
    """One epoch under a fake clock advancing `tick` seconds per reading. -> (bar losses shown in order,
    host reads of tensors during the epoch's steps by method, steps, fake seconds of the epoch)."""
    shown, reads, in_epoch = [], collections.Counter(), [False]
    clock = FakeClock(tick)
    monkeypatch.setenv("TRITON_INTERPRET", "0")     # the CPU paths a user runs: this tests the loop, not kernels
    monkeypatch.setattr(train_module, "monotonic", clock)
    set_postfix = train_module.tqdm.set_postfix

    def record_postfix(bar, *args, **kwargs):
        if str(bar.desc).startswith("epoch"):
            shown.append(kwargs["loss"])
        return set_postfix(bar, *args, **kwargs)
    monkeypatch.setattr(train_module.tqdm, "set_postfix", record_postfix)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if in_epoch[0]:
                reads[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    class CountedBatches(train_module.DevicePrefetcher):
        # counts only in the loop's body (step, scheduler, bar), not in the loader's collate
        def __iter__(self):
            for batch in super().__iter__():
                in_epoch[0] = True
                yield batch
                in_epoch[0] = False
    monkeypatch.setattr(train_module, "DevicePrefetcher", CountedBatches)

    class UncountedStep(train_module.TrainStep):
        # the step's own CPU paths read host tensors (no device there); that it never syncs on a device is
        # tests/test_model_sync.py's concern. Counted here: what the loop adds around it.
        def __call__(self, batch):
            in_epoch[0] = False
            try:
                return super().__call__(batch)
            finally:
                in_epoch[0] = True
    monkeypatch.setattr(train_module, "TrainStep", UncountedStep)
    train(TrainConfig(**SMALL, output_dir=str(tmp_path / "run")))
    n_steps = len(train_module.loaders(TrainConfig(**SMALL), train_module.load_dataset(
        "synthetic", synthetic_scale=SMALL["synthetic_scale"]), 0))
    return shown, reads, n_steps, clock.now - 100.0


def test_bar_loss_moves_within_an_epoch_refreshed_by_steps_with_bounded_reads(tmp_path, monkeypatch):
    shown, reads, steps, _ = run_epoch(tmp_path, monkeypatch, tick=0.0)        # time stands still
    assert steps > REFRESH_STEPS
    refreshes = 1 + (steps - 1) // REFRESH_STEPS           # the first step, then every REFRESH_STEPS steps
    assert len(shown) == refreshes and len(set(shown)) > 1, shown
    assert reads["item"] == 0 and reads["tolist"] == 0 and reads["numpy"] == 0, reads   # no per-step read
    assert reads["cpu"] == refreshes, reads                # one device-to-host copy per refresh
    assert reads["__float__"] <= 2 * refreshes < steps, reads


def test_bar_loss_refreshes_by_time_at_most_once_a_second(tmp_path, monkeypatch):
    shown, reads, steps, seconds = run_epoch(tmp_path, monkeypatch, tick=0.4)
    assert len(set(shown)) > 1, shown
    # at most one refresh per REFRESH_SECONDS of (fake) time, plus the first step's
    assert len(shown) <= 1 + seconds / REFRESH_SECONDS, (shown, seconds)
    # and more often than the step rule alone: time moved the loss
    assert len(shown) > 1 + (steps - 1) // REFRESH_STEPS, (len(shown), steps)
    assert reads["item"] == 0 and reads["cpu"] == len(shown), reads


@pytest.mark.parametrize("tick", [2 * REFRESH_SECONDS])
def test_slow_steps_show_every_step(tmp_path, monkeypatch, tick):
    shown, _, steps, _ = run_epoch(tmp_path, monkeypatch, tick=tick)
    assert len(shown) == steps
