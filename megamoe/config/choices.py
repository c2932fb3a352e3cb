"""Every config key that takes one of a fixed set of strings, as an enum: the one list of its options.

The schema (megamoe.config.schema) names each key's enum in its field metadata, validation
checks values against it, and code compares with its members (``cfg.parallel.schedule ==
Schedule.DUALPIPEV``), so a misspelt option is a type error, not a silent branch. Config values
stay plain strings (OmegaConf's enum nodes accept member names only, and ``1f1b`` is not an
identifier); a member equals its string.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """A config option: equal to, and printed as, its string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class FfnType(Choice):
    MOE = "moe"  # MoE FFNs in the layers moe.layer_freq selects, dense SwiGLUs in the others
    DENSE = "dense"  # a dense SwiGLU baseline, the upcycling source


class Router(Choice):
    ATTENTION = "attention"  # the paper's Attention Router
    LINEAR = "linear"  # classical


class RouterMode(Choice):
    TOKEN_CHOICE = "token_choice"  # each token its top-k experts (the paper)
    EXPERT_CHOICE = "expert_choice"  # each expert its top-c tokens (Zhou et al., 2022)


class RouterOrder(Choice):
    TOPK_SOFTMAX = "topk_softmax"  # top-k of the logits, softmax over the k (Megatron, vLLM, the paper)
    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, top-k (Yuan's HF code, Qwen)


class Switch(Choice):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Schedule(Choice):
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved_1f1b"
    INTERLEAVED_ZERO_BUBBLE = "interleaved_zero_bubble"
    ZBV_ZERO_BUBBLE = "zbv_zero_bubble"
    DUALPIPEV = "dualpipev"


# Schedules that place a rank's two stages in a V (rank r: stages r and 2·pp − 1 − r), not in a loop.
V_SCHEDULES: tuple[Schedule, ...] = (Schedule.ZBV_ZERO_BUBBLE, Schedule.DUALPIPEV)


class StageBalance(Choice):
    EVEN = "even"  # num_layers / stages each
    AUTO = "auto"  # the split that balances the stage cost model


class Backend(Choice):
    AUTO = "auto"  # nccl with CUDA, else gloo
    NCCL = "nccl"
    GLOO = "gloo"


class DataKind(Choice):
    INDEXED = "indexed"
    MOCK = "mock"


class TokenizerType(Choice):
    BYTE = "ByteTokenizer"
    HUGGING_FACE = "HuggingFaceTokenizer"
    SENTENCE_PIECE = "SentencePieceTokenizer"


class Decay(Choice):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Optimizer(Choice):
    ADAMW = "adamw"
    MUON = "muon"  # Muon on the hidden matrices, AdamW on embeddings, head, norms, biases (docs/optimizer.md)


class MuonAdjustLr(Choice):
    MATCH_RMS_ADAMW = "match_rms_adamw"  # Moonlight's 0.2·√max(A, B): AdamW's lr and weight decay carry over
    ORIGINAL = "original"  # Keller Jordan's √max(1, A/B), for a Muon-tuned lr
    NONE = "none"


class StateDtype(Choice):
    FP32 = "fp32"
    BF16 = "bf16"


class Precision(Choice):
    AUTO = "auto"  # bf16 on CUDA, fp32 on CPU
    BF16 = "bf16"
    FP32 = "fp32"


class Recompute(Choice):
    NONE = "none"
    FULL = "full"
    SELECTIVE = "selective"


class Compile(Choice):
    NONE = "none"
    BLOCK = "block"


class OnNonFinite(Choice):
    SKIP = "skip"
    STOP = "stop"


class OnError(Choice):
    CONTINUE = "continue"
    STOP = "stop"


class WandbMode(Choice):
    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"
