"""Checkpoints: save / resume / reshard under layout-independent names (see docs/checkpoints.md)."""

from megamoe.checkpoint.names import expert_tensor_name, model_tensor_shapes
from megamoe.checkpoint.saver import CheckpointSaver, save_checkpoint
from megamoe.checkpoint.state import TrainingState, load_checkpoint, resume
from megamoe.checkpoint.store import iter_model_tensors, read_config, write_model_checkpoint
from megamoe.errors import CheckpointError

__all__ = [
    "CheckpointError", "CheckpointSaver", "TrainingState", "expert_tensor_name", "iter_model_tensors",
    "load_checkpoint", "model_tensor_shapes", "read_config", "resume", "save_checkpoint", "write_model_checkpoint",
]
