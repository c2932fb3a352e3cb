"""moe.layer_freq: Megatron-Core's --moe-layer-freq meaning, its three spellings, and one line for
every value that cannot be built."""

from __future__ import annotations

import pytest

from megamoe.config import compose
from megamoe.config.layers import layer_freq_of, moe_layer_flags
from megamoe.errors import ConfigError
from megamoe.models import validate_config

T, F = True, False


def flags(*overrides: str) -> tuple[bool, ...]:
    cfg = compose(["+exp=tiny", *overrides])
    validate_config(cfg)
    return moe_layer_flags(cfg.model, cfg.moe)


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], (T, T, T, T)),  # the default, 1: every layer
    (["model.ffn_type=dense"], (F, F, F, F)),
    (["moe.layer_freq=2"], (T, F, T, F)),  # Megatron: layer i when i % N == 0, from layer 0
    (["model.num_layers=7", "moe.layer_freq=3"], (T, F, F, T, F, F, T)),
    (["moe.layer_freq=9"], (T, F, F, F)),  # N beyond the stack: layer 0 only
    (["moe.layer_freq=[0,1,1,0]"], (F, T, T, F)),
    (["moe.layer_freq='([0]*1+[1]*3)'"], (F, T, T, T)),  # Megatron's string form
    (["moe.layer_freq='[0, 1] * 2'"], (F, T, F, T)),
])
def test_which_layers_are_moe(overrides: list[str], expected: tuple[bool, ...]) -> None:
    assert flags(*overrides) == expected


@pytest.mark.parametrize(("pattern", "value"), [
    ((T, T, T, T), 1), ((T, F, T, F), 2), ((T, F, F, T), 3), ((T, F, F, F, F), 5), ((F, T, T, T), [0, 1, 1, 1]),
])
def test_the_shortest_value_selects_the_same_layers(pattern: tuple[bool, ...], value: int | list[int]) -> None:
    """What an import writes (the Qwen2-MoE adapter): the smallest N when one selects the layers, else the list."""
    assert layer_freq_of(pattern) == value
    assert flags(f"model.num_layers={len(pattern)}", f"moe.layer_freq={str(value).replace(' ', '')}") == pattern


@pytest.mark.parametrize(("overrides", "expected"), [
    (["moe.layer_freq=0"],
     "moe.layer_freq: 0 must be >= 1 (layer i is MoE when i % N == 0), or a list of one 0 / 1 per layer"),
    (["moe.layer_freq=[0,1,1]"],
     "moe.layer_freq: [0, 1, 1] has 3 entries, but model.num_layers=4 needs one per layer"),
    (["moe.layer_freq=[0,2,1,1]"],
     "moe.layer_freq: [0, 2, 1, 1] has 2 for layer 1; each entry is 1 (MoE) or 0 (dense FFN)"),
    (["moe.layer_freq=[0,0,0,0]"],
     "moe.layer_freq: [0, 0, 0, 0] makes no layer MoE; a model without MoE layers is model.ffn_type=dense"),
    (["moe.layer_freq=1.5"],
     "moe.layer_freq: 1.5 is not an int N (every N-th layer is MoE) or a list of one 0 / 1 per layer"),
    (["moe.layer_freq='([0]*3+[1]'"],
     "moe.layer_freq: '([0]*3+[1]' is not a list expression such as '([0]*3+[1]*9)' (lists of 0 / 1, repeated "
     "with * and joined with +)"),
    (["moe.layer_freq='__import__(\"os\")'"],
     "moe.layer_freq: '__import__(\"os\")' is not a list expression such as '([0]*3+[1]*9)' (lists of 0 / 1, "
     "repeated with * and joined with +)"),
    (["model.ffn_type=dense", "moe.layer_freq=2"],
     "moe.layer_freq: 2 chooses MoE layers, but model.ffn_type=dense builds none; set model.ffn_type=moe for a "
     "model that mixes dense and MoE layers, or drop moe.layer_freq"),
])
def test_a_value_that_cannot_be_built_is_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose(["+exp=tiny", *overrides]))
    assert str(info.value) == expected
