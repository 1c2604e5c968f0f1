"""mcncl_fast: MCN-CL for emotion recognition in conversation, with fused kernels."""
from . import ops, reference
from .model import Model, ModelConfig, ModelOutput

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "ModelOutput", "ops", "reference", "__version__"]
