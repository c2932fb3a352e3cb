"""Checkpoints: save / resume / reshard under layout-independent names (see docs/checkpoints.md)."""

from megamoe.checkpoint.state import load_checkpoint, resume, save_checkpoint
from megamoe.checkpoint.store import (
    CheckpointError,
    expert_tensor_name,
    iter_model_tensors,
    model_tensor_shapes,
    read_config,
    write_model_checkpoint,
)

__all__ = [
    "CheckpointError", "expert_tensor_name", "iter_model_tensors", "load_checkpoint", "model_tensor_shapes",
    "read_config", "resume", "save_checkpoint", "write_model_checkpoint",
]
