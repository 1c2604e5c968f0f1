"""Public functional ops with device dispatch (DESIGN.md §4, §5)."""
from .attention import attention, attention_grouped
from .psa import psa, psa_pool
from .supcon import hard_negative_counts, supcon_hard_negative_loss

__all__ = ["attention", "attention_grouped", "psa", "psa_pool", "supcon_hard_negative_loss", "hard_negative_counts"]
