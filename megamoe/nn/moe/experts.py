"""The bank of SwiGLU experts this process holds, run on expert-sorted tokens."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.compat import grouped_mm, has_grouped_mm
from megamoe.errors import ConfigError
from megamoe.nn.casts import CastCache, compute_dtype
from megamoe.nn.ffn import swiglu
from megamoe.nn.init import seeded_normal_

# A CUDA grouped GEMM reads every group through 16-byte aligned tiles, also in the backward
# weight gradient where the token dim is contracted: group sizes must be multiples of 8 bf16 rows.
GROUPED_GEMM_ROW_ALIGN = 8


class ExpertBank(nn.Module):
    """Experts ``first_expert .. first_expert + num_local_experts - 1``, stored as two 3-D weights.

    ``w1`` [n, 2·ffn, hidden] (gate rows first, then up — the HF per-expert ``w1``) and ``w2``
    [n, hidden, ffn]. Expert e computes w2[e] · swiglu(w1[e] · x) on its contiguous slice of
    the sorted tokens. On CUDA (``grouped_gemm`` auto/on, bf16) one ``torch._grouped_mm`` per
    weight runs all experts; elsewhere a loop over experts (never over tokens) runs one plain
    matmul chain per slice, which on CPU beats grouped/padded alternatives.

    Under autocast both paths read the weights' bf16 copies from a :class:`CastCache`: inside
    the trainer's ``shared_casts()`` (one step's passes) made once and shared by every
    micro-batch, instead of one copy per micro-batch in flight (autocast's own cache skips the
    per-expert views).
    """

    def __init__(self, num_local_experts: int, first_expert: int, hidden_size: int, ffn_hidden_size: int,
                 grouped_gemm: str = "auto") -> None:
        super().__init__()
        if grouped_gemm == "on" and not has_grouped_mm():
            raise ConfigError(f"moe.grouped_gemm: 'on' needs torch._grouped_mm, which torch {torch.__version__} "
                              "lacks; use moe.grouped_gemm=auto or off")
        self.num_local_experts = num_local_experts
        self.first_expert = first_expert
        self.grouped_gemm = grouped_gemm
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(num_local_experts, 2 * ffn_hidden_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, hidden_size, ffn_hidden_size))
        self._w1_cast, self._w2_cast = CastCache(), CastCache()

    def reset_parameters(self, std: float, seed: int, layer_index: int) -> None:
        """Each expert from its GLOBAL identity, so any expert placement gets the same values."""
        for local, (w1, w2) in enumerate(zip(self.w1, self.w2)):
            expert = self.first_expert + local
            seeded_normal_(w1, std, seed, layer_index, "expert", expert, "w1")
            seeded_normal_(w2, std, seed, layer_index, "expert", expert, "w2")

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """tokens [n, H] grouped by local expert with group sizes ``tokens_per_expert`` → [n, H]."""
        if self._use_grouped_gemm(tokens):
            return self._grouped(tokens, tokens_per_expert)
        return self._loop(tokens, tokens_per_expert)

    def _use_grouped_gemm(self, tokens: torch.Tensor) -> bool:
        if self.grouped_gemm != "auto":
            return self.grouped_gemm == "on"
        dtype = compute_dtype(tokens)
        aligned = all(size * dtype.itemsize % 16 == 0 for size in (self.hidden_size, self.ffn_hidden_size))
        return has_grouped_mm() and tokens.is_cuda and dtype == torch.bfloat16 and aligned

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 and w2 in ``dtype``: the parameters, or their cached cast copies."""
        return self._w1_cast(self.w1, dtype), self._w2_cast(self.w2, dtype)

    def _loop(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # unbind (not w1[e]) so the backward stacks the expert grads once instead of
        # scattering each into a full-size zero tensor.
        slices = tokens.split(tokens_per_expert)
        w1, w2 = self._weights(compute_dtype(tokens))
        experts = zip(slices, w1.unbind(0), w2.unbind(0))
        return torch.cat([F.linear(swiglu(F.linear(x, w1_e)), w2_e) for x, w1_e, w2_e in experts])

    def _grouped(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Two grouped GEMMs over row-aligned groups (zero rows pad each group to the alignment).

        The final ``index_select`` out of the padded layout also hands the grouped GEMMs'
        backward fresh contiguous gradients, which ``torch._grouped_mm`` requires.
        """
        dtype, device, n = compute_dtype(tokens), tokens.device, tokens.shape[0]
        align = GROUPED_GEMM_ROW_ALIGN
        padded = [-(-count // align) * align for count in tokens_per_expert]
        group_ends = list(itertools.accumulate(padded))
        group_starts = itertools.accumulate([0, *tokens_per_expert[:-1]])
        shift = [end - size - start for end, size, start in zip(group_ends, padded, group_starts)]
        rows = torch.arange(n, device=device) + torch.repeat_interleave(  # each row's place in the padded layout
            torch.tensor(shift, device=device), torch.tensor(tokens_per_expert, device=device), output_size=n)
        x = tokens.new_zeros(group_ends[-1], tokens.shape[1], dtype=dtype).index_copy(0, rows, tokens.to(dtype))
        offs = torch.tensor(group_ends, dtype=torch.int32, device=device)
        w1, w2 = self._weights(dtype)
        h = grouped_mm(x, w1.transpose(-2, -1), offs)
        y = grouped_mm(swiglu(h), w2.transpose(-2, -1), offs)
        return y.index_select(0, rows)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' parameters in ``model``, found by module type: they live on one ep rank
    each, so their gradients are averaged over edp, not dp (names play no part)."""
    return [p for module in model.modules() if isinstance(module, ExpertBank) for p in module.parameters()]
