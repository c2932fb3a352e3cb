"""LFA and Yuan attention against references written from the definitions, and causality."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from megamoe.models.yuan.attention import CausalConv, LocalizedFiltering, YuanAttention
from megamoe.nn.documents import Documents
from megamoe.nn.rope import RotaryEmbedding, apply_rotary


@pytest.fixture(autouse=True)
def float64():
    """Compare in float64 so the references match to rounding, not to fp32 noise."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


MODEL = OmegaConf.create(
    {"hidden_size": 12, "num_heads": 3, "head_dim": 8, "rotary_percent": 0.5, "rotary_base": 10000.0,
     "rms_norm_eps": 1e-6, "use_lfa": True}
)


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module


def conv_reference(conv: CausalConv, x: torch.Tensor) -> torch.Tensor:
    """y[t] = W[:, :, 0]·x[t-1] + W[:, :, 1]·x[t] + b, token by token, x[-1] = 0."""
    w, out = conv.weight, []
    for t in range(x.shape[1]):
        prev = x[:, t - 1] if t > 0 else torch.zeros_like(x[:, 0])
        out.append(prev @ w[:, :, 0].T + x[:, t] @ w[:, :, 1].T + conv.bias)
    return torch.stack(out, dim=1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def yuan_lf_reference(lf: LocalizedFiltering, x: torch.Tensor) -> torch.Tensor:
    """Yuan's own formulation: Conv2d kernel (2, 1), padding (1, 0) on [b, H, s, 1], keep the first s."""
    s = x.shape[1]
    h = x.transpose(1, 2)[..., None]
    y1 = F.conv2d(h, lf.conv1.weight[..., None], lf.conv1.bias, padding=(1, 0))[:, :, :s]
    y2 = F.conv2d(y1, lf.conv2.weight[..., None], lf.conv2.bias, padding=(1, 0))[:, :, :s]
    return rms_norm(y2[..., 0].transpose(1, 2) + x, lf.norm.weight, lf.norm.eps)


def attention_reference(attn: YuanAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """softmax(q·k / sqrt(d) over keys j ≤ i) · v per head, q and k from LF(x), v from x."""
    filtered = yuan_lf_reference(attn.lf, x)
    heads, d = attn.num_heads, attn.head_dim
    cos, sin = RotaryEmbedding(int(d * MODEL.rotary_percent), MODEL.rotary_base)(positions)
    q = apply_rotary((filtered @ attn.q_proj.weight.T).unflatten(-1, (heads, d)).transpose(1, 2), cos, sin)
    k = apply_rotary((filtered @ attn.k_proj.weight.T).unflatten(-1, (heads, d)).transpose(1, 2), cos, sin)
    v = (x @ attn.v_proj.weight.T).unflatten(-1, (heads, d)).transpose(1, 2)
    b, _, s, _ = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(heads):
            for i in range(s):
                scores = torch.stack([q[bi, h, i] @ k[bi, h, j] / math.sqrt(d) for j in range(i + 1)])
                out[bi, h, i] = torch.softmax(scores, 0) @ v[bi, h, : i + 1]
    return out.transpose(1, 2).flatten(2) @ attn.o_proj.weight.T


def test_causal_conv_matches_token_loop() -> None:
    conv = randomize(CausalConv(6, 4))
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(conv(x), conv_reference(conv, x))


def test_lf_matches_yuan_conv2d_layout() -> None:
    lf = randomize(LocalizedFiltering(12, 1e-6))
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(lf(x), yuan_lf_reference(lf, x))


def test_lf_starts_afresh_at_each_document() -> None:
    """With documents (data.reset_attention_mask) the filter of each document equals the filter
    of that document alone (Yuan's own code, which never resets it, is the case without)."""
    lf = randomize(LocalizedFiltering(12, 1e-6))
    x = torch.randn(1, 9, 12)
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2]])
    packed = lf(x, documents=Documents(ids))
    for start, stop in ((0, 3), (3, 4), (4, 9)):
        torch.testing.assert_close(packed[:, start:stop], yuan_lf_reference(lf, x[:, start:stop]))
    assert not torch.allclose(lf(x)[:, 3:5], packed[:, 3:5])


def test_lf_sees_exactly_tokens_t_minus_2_to_t() -> None:
    lf = randomize(LocalizedFiltering(12, 1e-6))
    x = torch.randn(1, 9, 12)
    t = 4
    changed = x.clone()
    changed[:, t] += 1.0
    moved = (lf(changed) - lf(x)).abs().amax(-1)[0]
    assert torch.all(moved[:t] == 0), "an output depends on a later token"
    assert torch.all(moved[t : t + 3] > 0)
    assert torch.all(moved[t + 3 :] == 0), "receptive field is wider than t-2..t"


def test_attention_matches_reference() -> None:
    attn = randomize(YuanAttention(MODEL))
    x = torch.randn(2, 6, 12)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3]])  # second row restarts after an EOD
    rope = RotaryEmbedding(4, MODEL.rotary_base)(positions)
    torch.testing.assert_close(attn(x, rope), attention_reference(attn, x, positions))


@pytest.mark.parametrize("use_lfa", [True, False])
def test_attention_is_causal(use_lfa: bool) -> None:
    attn = randomize(YuanAttention(OmegaConf.merge(MODEL, {"use_lfa": use_lfa})))
    x = torch.randn(1, 8, 12)
    rope = RotaryEmbedding(4)(torch.arange(8)[None])
    for t in range(8):
        changed = x.clone()
        changed[:, t] += 1.0
        moved = (attn(changed, rope) - attn(x, rope)).abs().amax(-1)[0]
        assert torch.all(moved[:t] == 0), f"an output before token {t} depends on it"
        assert torch.all(moved[t:] > 0)

