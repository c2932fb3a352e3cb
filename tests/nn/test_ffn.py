"""SwiGLU against its formula, and key-seeded initialisation (megamoe.nn.init)."""

import os
import subprocess
import sys

import torch
from torch.testing import assert_close

from megamoe.nn.ffn import SwiGLU
from megamoe.nn.init import init_key_seed, seeded_normal_


def test_swiglu_matches_definition_with_gate_rows_first():
    ffn = SwiGLU(hidden_size=6, ffn_hidden_size=5)
    ffn.reset_parameters(0.5, 0)
    x = torch.randn(3, 4, 6)
    w1, w2 = ffn.w1.weight, ffn.w2.weight
    gate, up = x @ w1[:5].T, x @ w1[5:].T
    expected = (gate * torch.sigmoid(gate) * up) @ w2.T
    assert w1.shape == (10, 6) and w2.shape == (6, 5)
    assert_close(ffn(x), expected)


def test_initialisation_depends_on_the_key_only():
    a, b, c = SwiGLU(8, 16), SwiGLU(8, 16), SwiGLU(8, 16)
    torch.manual_seed(0)
    a.reset_parameters(0.02, 1234, 3, "ffn")
    torch.manual_seed(1)  # the global RNG state must not matter
    b.reset_parameters(0.02, 1234, 3, "ffn")
    c.reset_parameters(0.02, 1234, 4, "ffn")
    assert torch.equal(a.w1.weight, b.w1.weight) and torch.equal(a.w2.weight, b.w2.weight)
    assert not torch.equal(a.w1.weight, c.w1.weight)
    assert not torch.equal(a.w1.weight[:8, :8], a.w2.weight[:8, :8])  # w1 and w2 have distinct keys


def test_seeded_normal_has_the_std_and_is_the_same_in_every_dtype():
    t32, t64 = torch.empty(256, 256), torch.empty(256, 256, dtype=torch.float64)
    seeded_normal_(t32, 0.02, "key", 1)
    seeded_normal_(t64, 0.02, "key", 1)
    assert torch.equal(t64, t32.double())
    assert abs(t32.std().item() - 0.02) < 0.02 * 0.02
    assert abs(t32.mean().item()) < 0.02 * 0.02


def test_meta_tensors_are_left_alone():
    with torch.device("meta"):
        ffn = SwiGLU(8, 16)
    ffn.reset_parameters(0.02, 0)
    assert ffn.w1.weight.is_meta


def test_key_seed_is_the_same_in_another_process():
    key = (1234, 5, "expert", 17, "w1")
    code = f"from megamoe.nn.init import init_key_seed; print(init_key_seed(*{key!r}))"
    env = dict(os.environ, PYTHONHASHSEED="123")  # hash() differs between processes; our seed must not
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == init_key_seed(*key)
    assert init_key_seed(*key) != init_key_seed(1234, 5, "expert", 18, "w1")

