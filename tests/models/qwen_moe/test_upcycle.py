"""Qwen1.5-MoE's recipe end to end: a dense Qwen-MoE-family checkpoint upcycled into fine-grained
experts and a gated shared expert (``upcycle --shared-expert``), exported, computes in
transformers what the dense model computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2MoeForCausalLM

from megamoe.checkpoint import read_config, write_model_checkpoint
from megamoe.config import compose
from tests.launch.test_convert_checkpoint import convert
from tests.models.helpers import model_tensors, random_model
from tests.models.qwen_moe.conftest import token_ids


def test_upcycled_export_computes_the_dense_model_in_transformers(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    dense_cfg = compose(["+exp=qwen_moe_tiny", "model.ffn_type=dense"])  # a SwiGLU of 128 in every layer
    dense = random_model(dense_cfg)
    write_model_checkpoint(tmp_path / "dense", model_tensors(dense), dense_cfg)
    convert.main(["upcycle", "--dense", str(tmp_path / "dense"), "--output", str(tmp_path / "moe"),
                  "--num-experts", "2", "--granularity", "4", "--top-k", "1", "--shared-expert"])
    assert "8 experts of width 32, top-4 (2 copies x granularity 4) + a gated shared expert of width 128" \
        in capsys.readouterr().out
    cfg = read_config(tmp_path / "moe")
    assert (cfg.moe.num_shared_experts, cfg.moe.shared_expert_gate, cfg.moe.norm_topk_prob) == (1, True, True)

    convert.main(["to-hf", "--checkpoint", str(tmp_path / "moe"), "--output", str(tmp_path / "hf")])
    ids = token_ids()
    with torch.no_grad():
        upcycled = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert upcycled.config.norm_topk_prob and upcycled.config.shared_expert_intermediate_size == 128
        torch.testing.assert_close(upcycled(ids).logits, dense(ids), rtol=0, atol=1e-5)
