"""Public PSA ops: input checks and dispatch (DESIGN.md §4.1, issue #5 fills the Triton path)."""
from __future__ import annotations

from .._checks import check_psa_args
from ..reference import ops as reference_ops


def psa(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """x [N, L, C] -> [N, L, C]. See DESIGN.md §3 for the math."""
    check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    return reference_ops.psa(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)


def psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """Masked mean over valid frames of psa(...): [N, L, C] -> [N, C]."""
    check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    return reference_ops.psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
