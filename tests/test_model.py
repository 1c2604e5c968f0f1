"""Model-level tests: shapes, masks, loss composition, state_dict keys, bad inputs; the fast model
against the reference (parity, checkpoints both ways, dropout per stream)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mcncl_fast
from mcncl_fast import reference
from mcncl_fast.data import collate_dialogues, synthetic_splits
from tests.helpers import TOLERANCE, assert_close_rel

TINY = dict(text_dim=12, audio_dim=6, visual_dim=10, d_model=32, num_layers=2, num_heads=4, proj_dim=8,
            num_classes=5, dropout=0.0)


def make_batch(b=3, s=6, frames=4, cfg=None):
    cfg = cfg or mcncl_fast.ModelConfig(**TINY)
    utterance_mask = torch.ones(b, s, dtype=torch.bool)
    utterance_mask[1, 4:] = False
    utterance_mask[2, 1:] = False                       # a one-utterance dialogue
    frame_mask = torch.rand(b, s, frames) > 0.3
    frame_mask[0, 2] = False                            # an utterance with no valid frame
    return dict(text=torch.randn(b, s, cfg.text_dim), audio=torch.randn(b, s, cfg.audio_dim),
                visual=torch.randn(b, s, frames, cfg.visual_dim), utterance_mask=utterance_mask,
                frame_mask=frame_mask, labels=torch.randint(0, cfg.num_classes, (b, s)))


def test_state_dict_keys_match_reference_and_design():
    cfg = mcncl_fast.ModelConfig(**TINY)
    fast, ref = mcncl_fast.Model(cfg), reference.Model(cfg)
    assert list(fast.state_dict()) == list(ref.state_dict())
    sd = fast.state_dict()
    q = cfg.d_model // 4
    for s in range(4):   # PSA keys and shapes of DESIGN.md §3
        assert sd[f"psa.branches.{s}.weight"].shape == (q, q, 2 * (s + 1) + 1)
        assert sd[f"psa.branches.{s}.bias"].shape == (q,)
    assert sd["psa.se.fc1.weight"].shape == (q, cfg.d_model)
    assert sd["psa.se.fc2.weight"].shape == (cfg.d_model, q)
    assert sd["classifier.6.weight"].shape == (cfg.num_classes, cfg.d_model)
    assert reference.ModelConfig is mcncl_fast.ModelConfig


@pytest.mark.parametrize("kv_source", ["input", "layer"])
def test_forward_backward_with_masks(kv_source):
    cfg = mcncl_fast.ModelConfig(**{**TINY, "kv_source": kv_source})
    model = mcncl_fast.Model(cfg)
    batch = make_batch(cfg=cfg)
    out = model(**batch)
    assert out.logits.shape == (3, 6, cfg.num_classes)
    assert out.contrastive_loss.shape == (3,)
    expected = out.ce_loss + (torch.tensor([cfg.alpha, cfg.beta, cfg.gamma]) * out.contrastive_loss).sum()
    torch.testing.assert_close(out.loss, expected)
    valid = batch["utterance_mask"]
    torch.testing.assert_close(out.ce_loss, F.cross_entropy(out.logits[valid], batch["labels"][valid]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_padded_utterances_do_not_change_valid_outputs():
    torch.manual_seed(1)
    cfg = mcncl_fast.ModelConfig(**TINY)
    model = mcncl_fast.Model(cfg).eval()
    batch = make_batch(cfg=cfg)
    out = model(**batch)
    changed = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["utterance_mask"]
    changed["text"][pad] = 100.0
    changed["audio"][pad] = -50.0
    changed["labels"][pad] = 0
    out2 = model(**changed)
    valid = batch["utterance_mask"]
    torch.testing.assert_close(out.logits[valid], out2.logits[valid])
    torch.testing.assert_close(out.loss, out2.loss)


def test_without_labels_and_without_frame_mask():
    cfg = mcncl_fast.ModelConfig(**TINY)
    batch = make_batch(cfg=cfg)
    batch.pop("labels")
    batch["frame_mask"] = None
    out = mcncl_fast.Model(cfg)(**batch)
    assert out.loss is None and out.ce_loss is None and out.contrastive_loss is None
    assert set(out.features) == {"fused_t", "fused_a", "fused_v", "proj_t", "proj_a", "proj_v"}
    assert out.features["proj_t"].shape == (3, 6, cfg.proj_dim)


def test_loss_matches_hand_composition_from_reference_ops():
    cfg = mcncl_fast.ModelConfig(**TINY)
    model = reference.Model(cfg).eval()
    batch = make_batch(cfg=cfg)
    out = model(**batch)
    valid = batch["utterance_mask"]
    y = batch["labels"][valid]
    per_modality = [reference.ops.supcon_hard_negative_loss(out.features[f"proj_{m}"][valid], y, 0.07, 0.3)
                    for m in "tav"]
    torch.testing.assert_close(out.contrastive_loss, torch.stack(per_modality))


def test_model_trains_on_synthetic_data():
    splits = synthetic_splits(seed=0, scale=0.05, text_dim=12, audio_dim=6, visual_dim=10)
    cfg = mcncl_fast.ModelConfig(**{**TINY, **splits.model_dims(), "num_layers": 1})
    model = mcncl_fast.Model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate_dialogues([splits.train[i] for i in range(16)])
    first = None
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.6 * first


def test_bad_model_inputs():
    cfg = mcncl_fast.ModelConfig(**TINY)
    model = mcncl_fast.Model(cfg)
    batch = make_batch(cfg=cfg)
    with pytest.raises(ValueError, match="audio"):
        model(**{**batch, "audio": torch.randn(3, 6, 7)})
    with pytest.raises(ValueError, match="visual"):
        model(**{**batch, "visual": torch.randn(3, 6, cfg.visual_dim)})
    with pytest.raises(TypeError, match="utterance_mask"):
        model(**{**batch, "utterance_mask": batch["utterance_mask"].float()})
    with pytest.raises(ValueError, match="frame_mask"):
        model(**{**batch, "frame_mask": batch["frame_mask"][:, :, :2]})
    with pytest.raises(ValueError, match="labels"):
        model(**{**batch, "labels": torch.full((3, 6), cfg.num_classes)})
    with pytest.raises(TypeError, match="labels"):
        model(**{**batch, "labels": batch["labels"].float()})
    with pytest.raises(ValueError, match="kv_source"):
        mcncl_fast.ModelConfig(kv_source="both")
    with pytest.raises(ValueError, match="num_heads"):
        mcncl_fast.ModelConfig(d_model=36, num_heads=8)


def test_fast_modules_match_reference_modules():
    from mcncl_fast import modules
    from mcncl_fast.reference import model as ref_model
    torch.manual_seed(2)
    psa_ref, psa_fast = ref_model.PSA(16), modules.PSA(16)
    psa_fast.load_state_dict(psa_ref.state_dict())
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    torch.testing.assert_close(psa_fast(x, mask), psa_ref(x, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(psa_fast.pool(x, mask), psa_ref.pool(x, mask), rtol=1e-5, atol=1e-5)
    mha_ref, mha_fast = ref_model.MultiHeadAttention(16, 2), modules.MultiHeadAttention(16, 2)
    mha_fast.load_state_dict(mha_ref.state_dict())
    query, kv = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    kpm = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    torch.testing.assert_close(mha_fast(query, kv, kpm), mha_ref(query, kv, kpm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_labels", [False, True])
def test_torch_compile_fullgraph_traces_the_fast_model(with_labels):
    # DESIGN.md §5: every op is a custom op with a fake implementation, so the model traces whole
    cfg = mcncl_fast.ModelConfig(**TINY)
    model = mcncl_fast.Model(cfg)
    batch = make_batch(cfg=cfg)
    if not with_labels:
        batch.pop("labels")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got, want = compiled(**batch), model(**batch)
    torch.testing.assert_close(got.logits, want.logits)
    if with_labels:
        torch.testing.assert_close(got.loss, want.loss)
        got.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------ fast vs reference
# d_model / num_heads = 16: the fast model's attention takes its Triton path (through the interpreter)
FAST_PATH = dict(TINY, d_model=64, num_heads=4)


def _models(cfg):
    torch.manual_seed(3)
    ref = reference.Model(cfg)
    fast = mcncl_fast.Model(cfg)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _assert_same_step(fast, ref, out_fast, out_ref):
    """Logits, loss, features and every parameter gradient within DESIGN.md §6 (fp32: rel < 1e-5)."""
    assert_close_rel(out_fast.logits, out_ref.logits, torch.float32, "logits")
    assert_close_rel(out_fast.loss, out_ref.loss, torch.float32, "loss")
    for key in out_ref.features:
        assert_close_rel(out_fast.features[key], out_ref.features[key], torch.float32, key)
    out_fast.loss.backward()
    out_ref.loss.backward()
    fast_grads = fast.per_stream_gradients()
    assert list(fast_grads) == [name for name, _ in ref.named_parameters()]
    for name, p in ref.named_parameters():
        got, want = fast_grads[name], p.grad
        if name.endswith("k_proj.bias"):
            # softmax ignores a per-row constant: this gradient is 0 up to rounding, so compare it in
            # absolute terms against the scale of the k_proj.weight gradient
            scale = fast_grads[name.replace("bias", "weight")].norm()
            assert (got - want).norm() < TOLERANCE[torch.float32] * scale, name
        else:
            assert_close_rel(got, want, torch.float32, f"grad {name}")


@pytest.mark.parametrize("kv_source", ["input", "layer"])
def test_fast_training_step_matches_reference(kv_source):
    cfg = mcncl_fast.ModelConfig(**{**FAST_PATH, "kv_source": kv_source})
    ref, fast = _models(cfg)
    batch = make_batch(cfg=cfg)
    _assert_same_step(fast, ref, fast(**batch), ref(**batch))


@pytest.mark.parametrize("direction", ["reference->fast", "fast->reference"])
def test_state_dict_moves_between_fast_and_reference(direction):
    cfg = mcncl_fast.ModelConfig(**{**FAST_PATH, "dropout": 0.1})
    torch.manual_seed(4)
    source = (reference.Model if direction == "reference->fast" else mcncl_fast.Model)(cfg)
    target = (mcncl_fast.Model if direction == "reference->fast" else reference.Model)(cfg)
    target.load_state_dict(source.state_dict())            # strict: the same keys and shapes
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    batch = make_batch(cfg=cfg)
    with torch.no_grad():
        got, want = target.eval()(**batch), source.eval()(**batch)
    assert_close_rel(got.logits, want.logits, torch.float32, "logits")
    assert_close_rel(got.loss, want.loss, torch.float32, "loss")


def test_torch_compile_fullgraph_traces_the_stacked_training_step():
    # Triton attention path, dropout on: the stacked weights, the stacked linear's autograd.Function
    # and the one-op dropout all trace into one graph
    cfg = mcncl_fast.ModelConfig(**{**FAST_PATH, "dropout": 0.1})
    model = mcncl_fast.Model(cfg)
    batch = make_batch(cfg=cfg)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(**batch).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits)


def test_stacked_parameters_hold_the_per_stream_values_and_optimizer_states_stay_apart():
    # the MCN and head weights are stored stacked [3, ...] ([6, ...] for keys / values): the parameters an
    # optimizer sees differ from the reference's there; the state_dict and the values do not
    cfg = mcncl_fast.ModelConfig(**FAST_PATH)
    ref, fast = _models(cfg)
    ref_params = dict(ref.named_parameters())
    fast_params = dict(fast.named_parameters())
    for name, p in fast_params.items():
        if not name.startswith(("layers.", "heads.")):
            assert torch.equal(p, ref_params[name]), name
    d = cfg.d_model
    assert fast_params["layers.0_q0_w"].shape == (3, d, d)
    for g, m in enumerate("tav"):
        assert torch.equal(fast_params["layers.0_q0_w"][g], ref_params[f"layers.0.{m}.attn.0.q_proj.weight"])
        assert torch.equal(fast_params["heads.fc2_b"][g], ref_params[f"heads.{m}.fc2.bias"])
    # rows (sub-layer, stream) of the all-layer key/value block; columns layer, key | value
    assert torch.equal(fast_params["layers.kv_w"][4, 3 * d:4 * d], ref_params["layers.1.a.attn.1.v_proj.weight"])
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in ref.parameters())
    # a step's AdamW state resumes in a fast model; the reference's (per-stream) is refused with a clear error
    from mcncl_fast.data.errors import UserError
    from mcncl_fast.step import load_optimizer_state, make_optimizer
    batch = make_batch(cfg=cfg)
    for model in (fast, ref):
        model(**batch).loss.backward()
    opt, ref_opt = make_optimizer(fast, 1e-3, 1e-4), make_optimizer(ref, 1e-3, 1e-4)
    opt.step()
    ref_opt.step()
    resumed = mcncl_fast.Model(cfg)
    resumed.load_state_dict(copy.deepcopy(fast.state_dict()))
    resumed_opt = make_optimizer(resumed, 1e-3, 1e-4)
    load_optimizer_state(resumed_opt, copy.deepcopy(opt.state_dict()))
    for model, optimizer in ((fast, opt), (resumed, resumed_opt)):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    for (name, p), q in zip(fast.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    with pytest.raises(UserError, match="optimizer state: saved for"):
        load_optimizer_state(make_optimizer(mcncl_fast.Model(cfg), 1e-3, 1e-4), ref_opt.state_dict())
    with pytest.raises(UserError, match="optimizer state: saved for"):
        load_optimizer_state(make_optimizer(reference.Model(cfg), 1e-3, 1e-4), opt.state_dict())


def test_a_step_concatenates_no_stacked_weights():
    # the stacked parameters are used as stored: the step's concatenations (stacking the three streams'
    # activations, the loss's projections) are activation-sized, far below the stacked weights' size
    from torch.utils._python_dispatch import TorchDispatchMode

    class CatSizes(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.cat, torch.ops.aten.stack):
                self.sizes.append(out.numel())
            return out
    cfg = mcncl_fast.ModelConfig(**FAST_PATH)
    fast = mcncl_fast.Model(cfg)
    stacked = sum(p.numel() for name, p in fast.named_parameters() if name.startswith(("layers.", "heads.")))
    with CatSizes() as mode:
        fast(**make_batch(cfg=cfg)).loss.backward()
    assert mode.sizes and max(mode.sizes) < stacked / 10, (max(mode.sizes), stacked)
    for p in fast.parameters():
        assert p.grad is not None and p.grad.shape == p.shape


def test_training_mode_dropout_is_drawn_per_stream(monkeypatch):
    """With dropout > 0 in training mode the fast model equals the reference given the same masks:
    each of the fast model's stacked dropouts is replayed, stream by stream, into the reference's
    per-stream Dropout modules. The masks of the three streams are independent draws."""
    import mcncl_fast.model as fast_model
    p = 0.3
    cfg = mcncl_fast.ModelConfig(**{**FAST_PATH, "dropout": p})
    ref, fast = _models(cfg)
    masks = []

    def recording_dropout(x, prob, training):
        assert training and prob == p
        out, mask = torch.native_dropout(x, prob, True)
        masks.append(mask)
        return out
    monkeypatch.setattr(fast_model, "dropout", recording_dropout)
    batch = make_batch(cfg=cfg)
    out_fast = fast.train()(**batch)
    assert len(masks) == 4 * cfg.num_layers          # attention x 2, FFN hidden, FFN output
    for mask in masks:                                # [3, B·S, ·]: per-stream masks differ
        assert mask.shape[0] == 3 and not torch.equal(mask[0], mask[1]) and not torch.equal(mask[1], mask[2])
        assert 0.5 * p < 1 - mask.float().mean() < 1.5 * p

    # replay: the reference calls layer[m].dropout after sub-layers 0, 1 and the FFN, ffn[2] inside the FFN
    queues = {}
    for l, layer in enumerate(ref.layers):
        sub0, sub1, hidden, ffn_out = masks[4 * l:4 * l + 4]
        for g, m in enumerate("tav"):
            shape = (3, 6, -1)
            queues[id(layer[m].dropout)] = [sub0[g].view(shape), sub1[g].view(shape), ffn_out[g].view(shape)]
            queues[id(layer[m].ffn[2])] = [hidden[g].view(shape)]

    def replay(module, args):
        return args[0] * queues[id(module)].pop(0) / (1 - p)
    for module in ref.modules():
        if id(module) in queues:
            module.forward = lambda x, _module=module: replay(_module, (x,))
    out_ref = ref.train()(**batch)
    assert all(not q for q in queues.values())
    _assert_same_step(fast, ref, out_fast, out_ref)


def test_the_fast_model_differs_by_its_ops_namespace_only():
    import pickle
    from mcncl_fast import modules
    from mcncl_fast.reference.model import UsesOps
    cfg = mcncl_fast.ModelConfig(text_dim=8, audio_dim=6, visual_dim=5, d_model=16, num_layers=2, num_heads=2,
                                 proj_dim=8)
    # the reference: the PSA and every cross-attention module; the fast Model: the PSA only (its
    # cross-attentions run from the stacked weights, through the model's own ops)
    for cls, ops, n_users in ((mcncl_fast.Model, mcncl_fast.ops, 1),
                              (reference.Model, reference.ops, 1 + 2 * 3 * cfg.num_layers)):
        model = cls(cfg)
        users = [m for m in model.modules() if isinstance(m, UsesOps)]
        assert len(users) == n_users
        assert {m.ops for m in users} == {ops} and cls.ops is ops
        clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))  # copyable and picklable (ops kept by name)
        assert {m.ops for m in clone.modules() if isinstance(m, UsesOps)} == {ops}
    assert modules.PSA(16).ops is mcncl_fast.ops and modules.CrossModalLayer(cfg).attn[0].ops is mcncl_fast.ops
    assert reference.model.PSA(16).ops is reference.ops
