"""Plain PyTorch MCN-CL: the specification the fast path is tested against."""
from . import ops
from .model import Model, ModelConfig, ModelOutput

__all__ = ["Model", "ModelConfig", "ModelOutput", "ops"]
