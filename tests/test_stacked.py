"""The stacked linear's two CPU paths (one mm per stream; one batched GEMM, the path the interpreter and
the GPU take) give the same values and gradients, on the strided stream views the fast Model feeds it."""
import torch

from mcncl_fast.stacked import stacked_linear, streams


def _run(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)     # [B, S, G, k]
    weight = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = stacked_linear(streams(tokens), weight, bias)
    out.backward(torch.randn_like(out))
    return out.detach(), tokens.grad, weight.grad, bias.grad, (tokens, weight, bias)


def test_per_stream_gemms_match_the_batched_gemm_and_each_nn_linear(monkeypatch):
    loop, batched = _run(monkeypatch, interpret=False), _run(monkeypatch, interpret=True)
    for a, b in zip(loop[:4], batched[:4]):
        torch.testing.assert_close(a, b)
    tokens, weight, bias = loop[4]
    for g in range(3):     # independent of both: torch's own linear per stream
        torch.testing.assert_close(loop[0][g], torch.nn.functional.linear(tokens[:, :, g].reshape(10, 8),
                                                                          weight[g], bias[g]))
