"""The bank of SwiGLU experts this process holds, run on expert-sorted tokens."""

from __future__ import annotations

import bisect
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.compat import grouped_mm, has_grouped_mm
from megamoe.config.choices import Switch
from megamoe.errors import ConfigError
from megamoe.nn.casts import CastCache, compute_dtype
from megamoe.nn.ffn import swiglu
from megamoe.nn.init import seeded_normal_

# A CUDA grouped GEMM reads every group through 16-byte aligned tiles, also in the backward
# weight gradient where the token dim is contracted: group sizes must be multiples of 8 bf16 rows.
GROUPED_GEMM_ROW_ALIGN = 8
# torch._grouped_mm's CUDA kernels address an operand with 32-bit offsets and fault on one of
# 2^31 elements or more (torchtitan issue 1932: a [525312, 4096] input); M32's experts
# (2 × 8192 wide) reach it at 131,072 rows, e.g. a 16 × 4096-token micro-batch on one rank
# holding every expert. Longer inputs run in chunks of rows that keep every operand below it.
GROUPED_GEMM_MAX_ELEMENTS = 2**31 - 1


def uses_grouped_gemm(setting: str, dtype: torch.dtype, on_cuda: bool, hidden_size: int, ffn_hidden_size: int) -> bool:
    """Whether the experts run as grouped GEMMs: ``moe.grouped_gemm`` on / off, or with auto on
    CUDA in bf16 when both widths are 16-byte aligned (the dry run asks what a GPU would run)."""
    if setting != Switch.AUTO:
        return setting == Switch.ON
    aligned = all(size * dtype.itemsize % 16 == 0 for size in (hidden_size, ffn_hidden_size))
    return has_grouped_mm() and on_cuda and dtype == torch.bfloat16 and aligned


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
        if grouped_gemm == Switch.ON and not has_grouped_mm():
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
        if uses_grouped_gemm(self.grouped_gemm, compute_dtype(tokens), tokens.is_cuda, self.hidden_size,
                             self.ffn_hidden_size):
            return self._grouped(tokens, tokens_per_expert)
        return self._loop(tokens, tokens_per_expert)

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
        backward fresh contiguous gradients, which ``torch._grouped_mm`` requires. More rows than
        :data:`GROUPED_GEMM_MAX_ELEMENTS` allows run as consecutive chunks of rows.
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
        w1, w2 = self._weights(dtype)
        width = max(2 * self.ffn_hidden_size, self.hidden_size)  # the widest row of x, h, swiglu(h) and y
        limit = max(align, GROUPED_GEMM_MAX_ELEMENTS // width // align * align)
        if group_ends[-1] <= limit:
            y = _grouped_swiglu(x, w1, w2, group_ends)
        else:
            y = torch.cat([_grouped_rows(x, w1, w2, group_ends, start, stop)
                           for start, stop in row_chunks(group_ends, limit)])
        return y.index_select(0, rows)


def row_chunks(group_ends: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``limit`` rows covering ``group_ends[-1]`` rows, cut at a
    group's end wherever one falls inside the range: a group is cut only when it alone is longer
    than ``limit``, so every other expert's weight gradient still comes from one GEMM."""
    chunks, start, total = [], 0, group_ends[-1]
    while start < total:
        stop = min(start + limit, total)
        if stop < total:
            last_end = group_ends[bisect.bisect_right(group_ends, stop) - 1]
            stop = last_end if last_end > start else stop
        chunks.append((start, stop))
        start = stop
    return chunks


def _grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, group_ends: list[int]) -> torch.Tensor:
    """w2[g] · swiglu(w1[g] · x) for the rows of each group g (``group_ends``: cumulative row counts)."""
    offs = torch.tensor(group_ends, dtype=torch.int32, device=x.device)
    h = grouped_mm(x, w1.transpose(-2, -1), offs)
    return grouped_mm(swiglu(h), w2.transpose(-2, -1), offs)


def _grouped_rows(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, group_ends: list[int], start: int,
                  stop: int) -> torch.Tensor:
    """:func:`_grouped_swiglu` of the padded rows [start, stop) alone: the groups they overlap
    (cut at the chunk's ends), with those groups' experts' weights (views)."""
    first, last = bisect.bisect_right(group_ends, start), bisect.bisect_left(group_ends, stop)
    ends = [min(end, stop) - start for end in group_ends[first:last + 1]]
    return _grouped_swiglu(x[start:stop], w1[first:last + 1], w2[first:last + 1], ends)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' parameters in ``model``, found by module type: they live on one ep rank
    each, so their gradients are averaged over edp, not dp (names play no part)."""
    return [p for module in model.modules() if isinstance(module, ExpertBank) for p in module.parameters()]
