"""A checkpoint of any training layout → one single-process model, its tokenizer and config.

Checkpoints store every tensor under its global name, one tensor per expert
(megamoe.checkpoint.names), whatever the (dp, pp, ep) layout that saved them. Loading streams
them (the converter's reader, one shard in memory at a time) straight into the parameters of a
model built on the target device, expert e of a bank into row e.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megamoe.checkpoint.names import expert_bank_names, expert_tensor_name, model_tensor_shapes
from megamoe.checkpoint.store import checked_tensors, checkpoint_dir, iter_model_tensors, read_config
from megamoe.config.choices import RouterMode
from megamoe.data.tokenizer import Tokenizer, tokenizer_from_config
from megamoe.errors import UserError
from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder


def decoding_config(cfg: DictConfig) -> DictConfig:
    """The run config as generation builds the model: dropless token-choice routing, so a token's
    experts do not depend on the other tokens of its forward pass (see megamoe.inference.generate)."""
    if cfg.moe.router_mode == RouterMode.EXPERT_CHOICE:
        raise UserError("moe.router_mode=expert_choice: an expert picks among all tokens of a forward pass, so a "
                        "token's output depends on tokens after it and the model cannot generate token by token; "
                        "generate from a token_choice checkpoint")
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    if cfg.moe.capacity_factor is not None:
        print(f"note: generating without moe.capacity_factor={cfg.moe.capacity_factor} (dropless routing: "
              "what a token gets must not depend on the batch)", file=sys.stderr)
        cfg.moe.capacity_factor = None
    cfg.train.activation_checkpointing = "none"
    return cfg


def copy_tensors_(model: Decoder, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (global name, tensor) pairs into ``model``'s parameters and buffers, cast to their dtype."""
    targets = model.state_dict()  # views of the parameters themselves
    for bank in expert_bank_names(model):
        rows = targets.pop(bank)
        targets.update({expert_tensor_name(bank, e): rows[e] for e in range(rows.shape[0])})
    with torch.no_grad():
        for name, tensor in tensors:
            targets[name].copy_(tensor)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(path: Path | str, device: Optional[torch.device | str] = None
                    ) -> tuple[Decoder, Tokenizer, DictConfig]:
    """The model (eval mode, on ``device``: default one GPU if there is one), tokenizer and config
    of a checkpoint: a ``step_N/`` directory or a checkpoints directory (its latest)."""
    source = checkpoint_dir(Path(path))
    cfg = decoding_config(read_config(source))
    tokenizer = tokenizer_from_config(cfg.data.tokenizer)
    with torch.device(device or default_device()):
        model = build_stage(cfg)
    copy_tensors_(model, checked_tensors(iter_model_tensors(source), model_tensor_shapes(cfg), source))
    return model.eval(), tokenizer, cfg
