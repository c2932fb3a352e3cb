"""Config composition and validation: every user mistake stops with one line naming the key."""

from __future__ import annotations

import pytest
from omegaconf.errors import ReadonlyConfigError

from megamoe.config import compose
from megamoe.config.validate import validate_layout
from megamoe.errors import ConfigError
from megamoe.models import validate_config


def _error(overrides: list[str], world_size: int | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(compose(overrides), world_size)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_tiny_and_m32_compose_and_validate() -> None:
    tiny = compose(["+exp=tiny"])
    validate_config(tiny)
    assert tiny.model.hidden_size == 64 and tiny.data.kind == "mock"
    m32 = compose(["+exp=m32_2000b"])
    validate_config(m32)
    assert (m32.model.num_layers, m32.moe.num_experts, m32.moe.top_k) == (24, 32, 2)
    assert m32.model.num_heads * m32.model.head_dim == 4096
    assert (m32.train.global_batch, m32.train.seq_len, m32.parallel.pp, m32.parallel.ep) == (1536, 4096, 4, 8)
    paper = compose(["+exp=m32_2000b_paper_pp8"])
    validate_config(paper)
    assert (paper.parallel.pp, paper.parallel.ep, paper.train.micro_batch) == (8, 1, 2)  # the paper's layout
    assert paper.train.steps == m32.train.steps and paper.model == m32.model  # the same recipe and model


def test_composed_config_is_read_only() -> None:
    cfg = compose(["+exp=tiny"])
    with pytest.raises(ReadonlyConfigError):
        cfg.model.hidden_size = 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.hidden_sise=64"], "model.hidden_sise"),
        (["train.foo=1"], "train.foo"),
        (["nosection.x=1"], "nosection"),
        (["model.hidden_size=abc"], "model.hidden_size"),
        (["train.lr=fast"], "train.lr"),
        (["+exp=does_not_exist"], "exp/does_not_exist"),
        (["data=nope"], "data/nope"),
    ],
)
def test_unknown_key_or_wrong_type_names_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(["+exp=tiny", *overrides])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["moe.top_k=9"], "moe.top_k"),
        (["model.num_heads=3"], "model.hidden_size"),
        (["model.rotary_percent=1.5"], "model.rotary_percent"),
        (["model.head_dim=15", "model.rotary_percent=1.0"], "model.rotary_percent"),
        (["moe.router=hash"], "moe.router"),
        (["moe.capacity_factor=0"], "moe.capacity_factor"),
        (["train.min_lr=1.0"], "train.min_lr"),
        (["train.seq_len=1024"], "train.seq_len"),
        (["train.micro_batch=3"], "train.global_batch"),
        (["train.precision=fp8"], "train.precision"),
        (["parallel.pp=3"], "model.num_layers"),
        (["parallel.ep=3"], "moe.num_experts"),
        (["parallel.virtual_stages=2"], "parallel.virtual_stages"),
        (["moe.noisy_gating=true"], "moe.noisy_gating"),
        (["data.kind=indexed"], "data.sources"),
        (["data.split='90,10'"], "data.split"),
        (["model.vocab_size=0"], "model.vocab_size"),
        (["moe.aux_loss_coeff=-1"], "moe.aux_loss_coeff"),
        (["data=mock", "data.reset_attention_mask=true"], "data.reset_attention_mask"),
        (["train.optimizer=sgd"], "train.optimizer"),
        (["train.optimizer_state_dtype=fp8"], "train.optimizer_state_dtype"),
        (["train.optimizer=muon", "train.muon.adjust_lr=spectral"], "train.muon.adjust_lr"),
        (["train.optimizer=muon", "train.muon.momentum=1.0"], "train.muon.momentum"),
        (["train.optimizer=muon", "train.muon.ns_steps=0"], "train.muon.ns_steps"),
    ],
)
def test_impossible_combination_names_the_key(overrides: list[str], key: str) -> None:
    assert _error(["+exp=tiny", *overrides]).startswith(key + ":")


@pytest.mark.parametrize("override", ["train.muon.momentum=0.9", "train.muon.nesterov=false",
                                      "train.muon.ns_steps=3", "train.muon.adjust_lr=original"])
def test_muon_keys_under_adamw_are_one_error(override: str) -> None:
    """A Muon setting with train.optimizer=adamw would silently do nothing: it is a mistake to name."""
    key, value = override.split("=")
    assert _error(["+exp=tiny", override]) == (f"{key}: {value.replace('false', 'False')} has no meaning with "
                                               "train.optimizer=adamw (it is Muon's); set train.optimizer=muon, "
                                               "or remove the key")
    validate_config(compose(["+exp=tiny", override, "train.optimizer=muon"]))


@pytest.mark.parametrize(
    ("world", "overrides", "key"),
    [
        (3, ["parallel.pp=2"], "parallel.pp"),
        (6, ["parallel.ep=4"], "parallel.ep"),
        (6, ["train.global_batch=8"], "train.global_batch"),
    ],
)
def test_impossible_layout_names_the_numbers(world: int, overrides: list[str], key: str) -> None:
    message = _error(["+exp=tiny", *overrides], world_size=world)
    assert message.startswith(key + ":") and str(world) in message


def test_layout_gives_data_parallel_size() -> None:
    cfg = compose(["+exp=tiny", "parallel.pp=2", "parallel.ep=2"])
    assert validate_layout(cfg, 8) == 4
