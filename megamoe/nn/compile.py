"""``train.compile=block``: torch.compile each decoder layer's fixed-shape blocks.

What is compiled, per layer: the two RMSNorms, the attention block (projections, Yuan's LFA
convolutions, RoPE, SDPA), and the dense FFN — or, in an MoE layer, the router and the shared
experts. What stays eager: the MoE dispatch and the routed experts. Their shapes depend on the
data (how many tokens each expert receives, the all-to-all's split sizes, a host sync for
them), so a compiled graph would break there or recompile every step; they are matmuls over
a sorted token buffer with little left to fuse.

Each block is compiled in place (``nn.Module.compile``): names, parameters and checkpoints are
unchanged, and every layer's block shares one compiled graph (torch inlines module parameters
as graph inputs), so compile time does not grow with the number of layers. Where it pays off
is the fusion of the elementwise work between the matmuls (norms, RoPE, LFA's residual,
SwiGLU's gate): fewer passes over the activations. Training numerics stay fp32 / bf16 as
configured; the losses equal eager to fp32 rounding (tests/nn/test_compile.py).
"""

from __future__ import annotations

from torch import nn

from megamoe.nn.decoder import Decoder
from megamoe.nn.moe.layer import MoELayer


def compiled_blocks(model: Decoder) -> list[nn.Module]:
    """The modules :func:`compile_blocks` compiles, in layer order."""
    blocks: list[nn.Module] = []
    for layer in model.decoder_layers():
        blocks += [layer.input_norm, layer.attn, layer.post_attn_norm]
        if isinstance(layer.mlp, MoELayer):
            blocks += [m for m in (layer.mlp.router, layer.mlp.shared_experts) if m is not None]
        else:
            blocks.append(layer.mlp)
    if model.final_norm is not None:
        blocks.append(model.final_norm)
    return blocks


def compile_blocks(model: Decoder) -> None:
    """Compile ``model``'s fixed-shape blocks in place (see the module docstring)."""
    for block in compiled_blocks(model):
        block.compile()
