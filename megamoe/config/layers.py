"""Which decoder layers hold the MoE FFN and which the dense SwiGLU: ``moe.layer_freq``.

It has Megatron-Core's ``--moe-layer-freq`` meaning:

- an int N: layer i (0-based) is an MoE layer when i % N == 0. 1, the default, makes every
  layer MoE; 2 makes layers 0, 2, 4, … MoE and the others dense;
- a list with one 0 / 1 per layer (1 = MoE), e.g. ``[0, 0, 1, 1, 1, 1]`` for DeepSeek-style
  dense first layers;
- Megatron's string form of such a list, ``"([0]*3+[1]*9)"``: lists of 0 / 1, repeated with
  ``*`` and joined with ``+``.

A dense layer's FFN is the SwiGLU of width ``model.dense_ffn_hidden_size``. With
``model.ffn_type=dense`` every layer is dense and ``moe.layer_freq`` keeps its default; an
MoE model needs at least one MoE layer (one with none is ``model.ffn_type=dense``).
"""

from __future__ import annotations

import ast
import functools
from typing import Any, Sequence, Union

from omegaconf import ListConfig

from megamoe.config.choices import FfnType
from megamoe.errors import ConfigError

KEY = "moe.layer_freq"
LayerFreq = Union[int, list[int]]


def moe_layer_flags(model: Any, moe: Any) -> tuple[bool, ...]:
    """For each decoder layer, in global order: does it hold the MoE FFN? (``model`` / ``moe``:
    the config's sections, DictConfig or schema objects.) Raises ConfigError for a bad value."""
    value = moe.layer_freq
    if model.ffn_type == FfnType.DENSE:
        if not (type(value) is int and value == 1):
            raise ConfigError(f"{KEY}: {shown(value)} chooses MoE layers, but model.ffn_type=dense builds none; set "
                              f"model.ffn_type=moe for a model that mixes dense and MoE layers, or drop {KEY}")
        return (False,) * model.num_layers
    flags = _flags(tuple(value) if isinstance(value, (list, ListConfig)) else value, model.num_layers)
    if not any(flags):
        raise ConfigError(f"{KEY}: {shown(value)} makes no layer MoE; a model without MoE layers is "
                          "model.ffn_type=dense")
    return flags


def is_mixed(model: Any, moe: Any) -> bool:
    """Does the model have both dense and MoE layers?"""
    return len(set(moe_layer_flags(model, moe))) > 1


def layer_freq_of(flags: Sequence[bool]) -> LayerFreq:
    """The shortest ``moe.layer_freq`` that selects ``flags``: the int N when every N-th layer is
    MoE (the smallest such N), else the list of 0 / 1."""
    for n in range(1, len(flags) + 1):
        if all(flag == (i % n == 0) for i, flag in enumerate(flags)):
            return n
    return [int(flag) for flag in flags]


def shown(value: Any) -> str:
    """A ``moe.layer_freq`` value as an error message shows it (a list plainly, a string quoted)."""
    return repr(value) if isinstance(value, str) else str(list(value) if isinstance(value, ListConfig) else value)


@functools.lru_cache(maxsize=256)
def _flags(value: Any, num_layers: int) -> tuple[bool, ...]:
    """``moe.layer_freq`` (an int, a tuple of entries or Megatron's string) as one flag per layer."""
    if isinstance(value, str):
        value = tuple(_megatron_list(value))
    if isinstance(value, bool) or not isinstance(value, (int, tuple)):
        raise ConfigError(f"{KEY}: {shown(value)} is not an int N (every N-th layer is MoE) or a list of one 0 / 1 "
                          f"per layer")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{KEY}: {value} must be >= 1 (layer i is MoE when i % N == 0), or a list of one 0 / 1 "
                              "per layer")
        return tuple(i % value == 0 for i in range(num_layers))
    if len(value) != num_layers:
        raise ConfigError(f"{KEY}: {list(value)} has {len(value)} entries, but model.num_layers={num_layers} needs "
                          "one per layer")
    for i, entry in enumerate(value):
        if isinstance(entry, bool) or entry not in (0, 1):
            raise ConfigError(f"{KEY}: {list(value)} has {entry!r} for layer {i}; each entry is 1 (MoE) or 0 "
                              "(dense FFN)")
    return tuple(entry == 1 for entry in value)


def _megatron_list(text: str) -> list[Any]:
    """Evaluate Megatron's ``"([0]*3+[1]*9)"``: list literals, ``list * int`` and ``list + list`` only."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
                return left + right
            if isinstance(node.op, ast.Mult) and {type(left), type(right)} == {list, int}:
                return left * right
        raise ValueError

    try:
        result = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        result = None
    if not isinstance(result, list):
        raise ConfigError(f"{KEY}: {text!r} is not a list expression such as '([0]*3+[1]*9)' (lists of 0 / 1, "
                          "repeated with * and joined with +)")
    return result
