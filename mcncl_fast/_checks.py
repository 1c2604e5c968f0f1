"""Input validation shared by the reference and the fast ops (DESIGN.md §7).

Every check raises before any kernel launches and names the argument, what
was expected and what was given.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim=None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {_describe(t)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_describe(t)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}"
            )


def check_mask(name: str, mask, shape: Sequence[int], device: torch.device) -> None:
    if mask is None:
        return
    check_tensor(name, mask, ndim=len(shape), dtypes=(torch.bool,))
    check_shape(name, mask, shape)
    if mask.device != device:
        raise ValueError(f"{name}: expected device {device}, got {mask.device}")


def check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask):
    check_tensor("x", x, ndim=3)
    n, length, channels = x.shape
    if channels % 4 != 0:
        raise ValueError(f"x: channel count must be divisible by 4 (4 branches), got {_describe(x)}")
    quarter = channels // 4
    if not isinstance(weights, (list, tuple)) or len(weights) != 4:
        raise TypeError(f"weights: expected a sequence of 4 conv weights, got {type(weights).__name__}"
                        + (f" of length {len(weights)}" if isinstance(weights, (list, tuple)) else ""))
    if not isinstance(biases, (list, tuple)) or len(biases) != 4:
        raise TypeError(f"biases: expected a sequence of 4 conv biases, got {type(biases).__name__}"
                        + (f" of length {len(biases)}" if isinstance(biases, (list, tuple)) else ""))
    for s, (w, b) in enumerate(zip(weights, biases)):
        k = 2 * (s + 1) + 1
        check_tensor(f"weights[{s}]", w, ndim=3)
        check_shape(f"weights[{s}]", w, (quarter, quarter, k))
        check_tensor(f"biases[{s}]", b, ndim=1)
        check_shape(f"biases[{s}]", b, (quarter,))
    check_tensor("fc1_weight", fc1_weight, ndim=2)
    check_shape("fc1_weight", fc1_weight, (quarter, channels))
    check_tensor("fc1_bias", fc1_bias, ndim=1)
    check_shape("fc1_bias", fc1_bias, (quarter,))
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    check_shape("fc2_weight", fc2_weight, (channels, quarter))
    check_tensor("fc2_bias", fc2_bias, ndim=1)
    check_shape("fc2_bias", fc2_bias, (channels,))
    params = dict(fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    params.update({f"weights[{s}]": w for s, w in enumerate(weights)})
    params.update({f"biases[{s}]": b for s, b in enumerate(biases)})
    check_same_device("x", x, **params)
    for name, p in params.items():
        if p.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {p.dtype}")
    check_mask("frame_mask", frame_mask, (n, length), x.device)


def check_attention_args(q, k, v, key_padding_mask, scale):
    """q [B, H, Lq, Dh], k/v [B, H, Lk, Dh], key_padding_mask [B, Lk] bool or None."""
    _check_attention(q, k, v, scale, lead=2)
    check_mask("key_padding_mask", key_padding_mask, (q.shape[0], k.shape[2]), q.device)


def check_attention_grouped_args(q, k, v, key_padding_mask, scale):
    """q [G, B, H, Lq, Dh], k/v [G, B, H, Lk, Dh], key_padding_mask [B, Lk] (shared) or [G, B, Lk] bool or None."""
    _check_attention(q, k, v, scale, lead=3)
    if key_padding_mask is not None:
        g, b, _, _, _ = q.shape
        lk = k.shape[3]
        check_tensor("key_padding_mask", key_padding_mask, ndim=(2, 3), dtypes=(torch.bool,))
        check_mask("key_padding_mask", key_padding_mask, (b, lk) if key_padding_mask.dim() == 2 else (g, b, lk),
                   q.device)


def _check_attention(q, k, v, scale, lead):
    """Shared part: `lead` leading dims (batch, heads[, groups]) equal, then L, Dh."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=lead + 2)
    dims = tuple(q.shape[:lead])
    dh = q.shape[-1]
    if tuple(k.shape[:lead]) != dims or k.shape[-1] != dh:
        want = ", ".join(str(d) for d in dims)
        raise ValueError(f"k: expected shape ({want}, Lk, {dh}) to match q, got {_describe(k)}")
    check_shape("v", v, k.shape)
    check_same_device("q", q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    if scale is not None and (isinstance(scale, bool) or not (isinstance(scale, (int, float))
                                                               and math.isfinite(scale) and scale > 0)):
        raise ValueError(f"scale: expected a positive finite number or None, got {scale!r}")


def check_supcon_args(z, labels, temperature, hard_ratio, ignore_index=-100, num_classes=None):
    check_tensor("z", z, ndim=(2, 3))
    n = z.shape[-2]
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: expected an integer (int64/int32) tensor, got {_describe(labels)}")
    check_shape("labels", labels, (n,))
    check_same_device("z", z, labels=labels)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if not (isinstance(hard_ratio, (int, float)) and 0.0 < hard_ratio <= 1.0):
        raise ValueError(f"hard_ratio: expected a number in (0, 1], got {hard_ratio!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int or None, got {num_classes!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index: must lie outside the class ids [0, {num_classes}), got {ignore_index}")
    # labels must be class ids or ignore_index: an assertion on the device (no host sync on CUDA,
    # where a violation surfaces as a device-side assert; immediate on the CPU)
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    message = f"labels: expected values in [0, {num_classes}) or ignore_index={ignore_index}"
    try:
        torch._assert_async(~bad.any(), message)
    except RuntimeError:
        raise ValueError(f"{message}, got out-of-range values {labels[bad][:5].tolist()}") from None
