"""The training step: shape buckets, one compilation per bucket, CUDA graph bookkeeping, capturable AdamW.

CUDA graphs themselves need a GPU (`pytest -m gpu`); on CPU the bookkeeping of CudaGraphStep runs with a
capture that records the step and re-runs it on the static batch at each replay."""
import pytest
import torch

import mcncl_fast
from mcncl_fast.data import collate_dialogues
from mcncl_fast.data.buckets import ShapeBuckets
from mcncl_fast.data.buckets import round_up
from mcncl_fast.data.synthetic import SyntheticConversations
from mcncl_fast.step import CudaGraphStep, TrainStep, load_optimizer_state, make_optimizer
from tests.helpers import rel_error

DIMS = dict(text_dim=12, audio_dim=8, visual_dim=10)
CFG = dict(**DIMS, d_model=16, num_layers=1, num_heads=2, proj_dim=8, num_classes=7, dropout=0.0, ffn_mult=2)


def dialogues(n, seed=0, max_utterances=11, max_frames=5):
    data = SyntheticConversations("train", n, seed=seed, max_utterances=max_utterances, max_frames=max_frames, **DIMS)
    return [data[i] for i in range(n)]


def test_round_up_and_bucket_shapes():
    assert [round_up(n, (8, 16, 24)) for n in (1, 8, 9, 24, 25, 49)] == [8, 8, 16, 24, 48, 72]
    buckets = ShapeBuckets(batch_size=4, utterances=(4, 8), frames=(2, 4))
    batch = [{"labels": torch.zeros(5), "visual": [torch.zeros(3, 2)] * 5}, {"labels": torch.zeros(2),
             "visual": [torch.zeros(1, 2)] * 2}]
    assert buckets.shape(batch) == (4, 8, 4)
    out = buckets([dict(d, id=str(i), text=torch.ones(len(d["labels"]), 3), audio=torch.ones(len(d["labels"]), 2),
                        labels=torch.zeros(len(d["labels"]), dtype=torch.int64)) for i, d in enumerate(batch)])
    assert out["text"].shape == (4, 8, 3) and out["visual"].shape == (4, 8, 4, 2)
    assert out["utterance_mask"].sum() == 7 and out["frame_mask"].sum() == 5 * 3 + 2
    assert (out["labels"][~out["utterance_mask"]] == -100).all() and (out["text"][2:] == 0).all()
    with pytest.raises(ValueError, match="utterances"):
        ShapeBuckets(utterances=(8, 4))
    three = dialogues(3)
    with pytest.raises(ValueError, match="shape: 2 dialogues requested, the batch holds 3"):
        collate_dialogues(three, shape=(2, 8, 4))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_cls", [mcncl_fast.Model, mcncl_fast.reference.Model], ids=["fast", "reference"])
def test_bucket_padding_leaves_loss_and_gradients_unchanged(model_cls):
    torch.manual_seed(1)
    model = model_cls(mcncl_fast.ModelConfig(**CFG))
    items = dialogues(3, seed=4)
    tight = collate_dialogues(items)
    padded = ShapeBuckets(batch_size=5, utterances=(16,), frames=(8,))(items)
    assert padded["text"].shape[:2] == (5, 16) and tight["text"].shape != padded["text"].shape
    loss_tight, grads_tight = _loss_and_grads(model, tight)
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    assert torch.isfinite(loss_tight) and rel_error(loss_padded, loss_tight) < 1e-5
    assert grads_tight.keys() == grads_padded.keys()
    total = torch.cat([g.flatten() for g in grads_tight.values()]).norm()
    for name, g in grads_tight.items():
        # relative per tensor, with a floor for gradients that are zero up to rounding (key biases)
        assert (grads_padded[name] - g).norm() <= 1e-4 * g.norm() + 1e-6 * total, name


def test_compile_once_per_bucket(monkeypatch):
    """Static compilation (dynamic=False): every new batch shape recompiles; buckets leave one per bucket."""
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the CPU ops: what is counted here is dynamo's work
    torch._dynamo.reset()
    model = mcncl_fast.Model(mcncl_fast.ModelConfig(**CFG)).eval()
    items = dialogues(12, seed=2, max_utterances=20, max_frames=6)
    batches = [items[i:i + 3] for i in range(0, 12, 3)] + [items[:1]]      # 5 batches, the last one smaller

    def compiles(collate):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, dynamic=False)
        shapes = set()
        with torch.no_grad():
            for group in batches:
                batch = collate(group)
                shapes.add(tuple(batch["visual"].shape))
                compiled(**{k: v for k, v in batch.items() if k != "labels"})
        return counter.frame_count, shapes

    per_shape, _ = compiles(lambda group: collate_dialogues(items[:1]))       # one shape: the graphs of one compile
    tight, tight_shapes = compiles(collate_dialogues)
    bucketed, bucket_shapes = compiles(ShapeBuckets(batch_size=3, utterances=(16, 32), frames=(8,)))
    assert len(tight_shapes) >= 4 and len(bucket_shapes) <= 2
    assert tight == per_shape * len(tight_shapes)
    assert bucketed == per_shape * len(bucket_shapes)
    torch._dynamo.reset()


def replaying_capture(records):
    """A stand-in for CUDA graph capture: records the step; each replay re-runs it and writes the static output."""
    def capture(fn):
        static_out = torch.empty(0)
        records.append(fn)

        def replay():
            out = fn()
            static_out.resize_(out.shape).copy_(out)
        return replay, static_out
    return capture


def test_cuda_graph_step_captures_once_per_shape_and_replays_new_data():
    torch.manual_seed(0)
    config = mcncl_fast.ModelConfig(**CFG)
    eager_model = mcncl_fast.Model(config)
    graph_model = mcncl_fast.Model(config)
    graph_model.load_state_dict(eager_model.state_dict())
    collate = ShapeBuckets(batch_size=2, utterances=(8, 16), frames=(8,))
    items = dialogues(10, seed=5, max_utterances=14)
    batches = [collate(items[i:i + 2]) for i in range(0, 10, 2)]
    shapes = [tuple(b["text"].shape) for b in batches]
    assert 1 < len(set(shapes)) < len(shapes)                             # some shapes repeat

    def step_for(model):
        optimizer = make_optimizer(model, 1e-2, 1e-4)
        return TrainStep(lambda b: model(**b).loss, model, optimizer, grad_clip=1.0)

    eager = step_for(eager_model)
    records = []
    graphed = CudaGraphStep(step_for(graph_model), capture=replaying_capture(records))
    for batch in batches:
        eager_loss = eager(batch)
        graph_loss = graphed({k: v.clone() for k, v in batch.items()})
        assert rel_error(graph_loss, eager_loss) < 1e-5
    assert len(records) == len(set(shapes)) == len(graphed.graphs)
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert rel_error(q, p) < 1e-5, name


def test_optimizer_state_moves_between_capturable_and_plain():
    model = torch.nn.Linear(3, 2)
    plain = make_optimizer(model, 1e-2, 0.0)
    model(torch.randn(4, 3)).sum().backward()
    plain.step()
    capturable = make_optimizer(model, 5e-3, 0.0, capturable=True)
    assert isinstance(capturable.param_groups[0]["lr"], torch.Tensor)
    load_optimizer_state(capturable, plain.state_dict())
    group = capturable.param_groups[0]
    assert group["capturable"] is True and isinstance(group["lr"], torch.Tensor)
    assert float(group["lr"]) == pytest.approx(1e-2)
    exp_avg = plain.state[model.weight]["exp_avg"]
    assert torch.equal(capturable.state[model.weight]["exp_avg"], exp_avg)
    back = make_optimizer(model, 1.0, 0.0)
    load_optimizer_state(back, capturable.state_dict())
    assert back.param_groups[0]["capturable"] is False and back.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_cuda_graphs_on_cpu_is_a_one_line_error(capsys):
    from mcncl_fast.cli import main
    assert main(["train", "--cuda-graphs", "--device", "cpu", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cuda-graphs" in err and "CUDA" in err


# ----------------------------------------------------------------------------- on a GPU
def _cuda_setup(precision="fp32"):
    torch.manual_seed(0)
    device = torch.device("cuda")
    config = mcncl_fast.ModelConfig(**{**CFG, "d_model": 64, "num_heads": 4, "proj_dim": 32})
    collate = ShapeBuckets(batch_size=4, utterances=(8, 16), frames=(8,))
    items = dialogues(16, seed=6, max_utterances=14)
    batches = [{k: v.to(device) for k, v in collate(items[i:i + 4]).items()} for i in range(0, 16, 4)]
    return device, config, batches


def _gpu_step(model, capturable, precision="fp32"):
    optimizer = make_optimizer(model, 1e-3, 1e-4, capturable=capturable)

    def forward_loss(batch):
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
            return model(**batch).loss
    return TrainStep(forward_loss, model, optimizer, grad_clip=1.0)


@pytest.mark.gpu
def test_gpu_training_step_never_syncs():
    device, config, batches = _cuda_setup()
    model = mcncl_fast.Model(config).to(device)
    step = _gpu_step(model, capturable=True)
    step(batches[0])                                        # autotuning and lazy state first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_cuda_graph_step_matches_eager(precision):
    device, config, batches = _cuda_setup()
    eager_model = mcncl_fast.Model(config).to(device)
    graph_model = mcncl_fast.Model(config).to(device)
    graph_model.load_state_dict(eager_model.state_dict())
    eager = _gpu_step(eager_model, capturable=True, precision=precision)
    graphed = CudaGraphStep(_gpu_step(graph_model, capturable=True, precision=precision))
    tol = 1e-4 if precision == "fp32" else 5e-2
    for batch in batches * 2:
        eager_loss, graph_loss = eager(batch), graphed(batch)
        assert rel_error(graph_loss, eager_loss) < tol
    assert len(graphed.graphs) == len({tuple(b["text"].shape) for b in batches})
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert rel_error(q, p) < tol, name
