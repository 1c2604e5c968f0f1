"""Non-finite weights or logits never become a result: a NaN model is an error naming the cause, not an
F1 computed from argmax(NaN) = class 0."""
from __future__ import annotations

import torch

from .data.errors import UserError


class NonFiniteOutputError(UserError):
    """The model's logits (or weights) are NaN or infinite."""


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())


def check_weights(model, context: str) -> None:
    """Raise when a weight of `model` is NaN or infinite; `context` says where the weights come from."""
    if not weights_finite(model):
        raise NonFiniteOutputError(f"{context}: the model's weights are not finite (NaN or inf)")


def check_logits(model, logits, utterance_mask) -> None:
    """Raise when a real utterance's logits are not finite, naming the weights or the inputs as the cause."""
    real = logits[utterance_mask.bool()] if utterance_mask is not None else logits
    if bool(torch.isfinite(real).all()):
        return
    if not weights_finite(model):
        raise NonFiniteOutputError("the model's weights are not finite (NaN or inf): a diverged or corrupt "
                                   "checkpoint; its predictions would be meaningless")
    raise NonFiniteOutputError("the model's outputs are not finite (NaN or inf) on this data: the features hold "
                               "values too large for it (e.g. 1e30); check or rescale the input features")
