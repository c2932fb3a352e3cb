"""The reference the Qwen-MoE tests hold megamoe to: a small random transformers
``Qwen2MoeForCausalLM`` saved as transformers saves it, and megamoe's import of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from tests.launch.test_convert_checkpoint import convert

# hidden 64, 4 layers, 4 heads over 2 K/V heads, 8 experts of 32 (top-2), a shared expert of 64:
# the architecture of configs/exp/qwen_moe_tiny.yaml, written here in transformers' own terms.
TINY_HF_CONFIG = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 1e6,
    "rms_norm_eps": 1e-6, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "norm_topk_prob": False, "tie_word_embeddings": False,
}


def random_hf_model(seed: int = 0, **config: object) -> Qwen2MoeForCausalLM:
    """Every parameter random (norm weights near 1, biases and the shared-expert gate nonzero),
    so a swapped, transposed or dropped tensor changes the logits."""
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**TINY_HF_CONFIG, **config}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model.eval()


def token_ids(vocab_size: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@dataclass
class Release:
    """A transformers model, its saved directory, and megamoe's checkpoint imported from it."""

    model: Qwen2MoeForCausalLM
    hf_dir: Path
    checkpoint: Path


def saved_release(root: Path, **config: object) -> Release:
    """A random transformers model saved under ``root`` and imported by from-hf."""
    model = random_hf_model(**config)
    model.save_pretrained(root / "hf")  # safetensors, experts one tensor each, as transformers writes them
    convert.main(["from-hf", "--hf", str(root / "hf"), "--output", str(root / "imported"), "+exp=qwen_moe_tiny"])
    return Release(model, root / "hf", root / "imported")


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return saved_release(tmp_path_factory.mktemp("qwen_release"))


# Dense layers between the MoE ones, each way transformers' config says so: every second layer
# sparse (layers 1 and 3), and layers listed as dense (0 and 3; layers 1 and 2 sparse).
MIXED = {"decoder_sparse_step": {"decoder_sparse_step": 2}, "mlp_only_layers": {"mlp_only_layers": [0, 3]}}


@pytest.fixture(scope="session", params=sorted(MIXED))
def mixed_release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Release:
    return saved_release(tmp_path_factory.mktemp(f"qwen_{request.param}"), **MIXED[request.param])
