"""Typed configuration schema: one dataclass per section, registered in Hydra's ConfigStore.

Structured configs make OmegaConf reject unknown keys and wrong types at composition time,
so a typo in an override fails at startup with the key's name instead of being ignored.
Cross-field rules (divisibility, ranges) live in :mod:`megamoe.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    """The decoder. Defaults are Yuan 2.0-M32's (see configs/exp/m32_2000b.yaml)."""

    family: str = "yuan"  # a key of megamoe.models.FAMILIES: "yuan" | "qwen_moe"
    vocab_size: int = 135040
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: Optional[int] = None  # grouped-query attention (qwen_moe); None = num_heads
    head_dim: int = 256  # Megatron's --kv-channels; attention_projection_size = heads * head_dim
    qkv_bias: bool = False  # biases on the q/k/v projections (qwen_moe)
    rotary_percent: float = 0.5  # fraction of each head's dims that get RoPE
    rotary_base: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_embeddings: bool = True
    use_lfa: bool = True  # Localized Filtering-based Attention on Q and K
    ffn_type: str = "moe"  # "moe" | "dense" (dense SwiGLU baseline, upcycling source)
    dense_ffn_hidden_size: int = 8192
    init_std: float = 0.02


@dataclass
class MoEConfig:
    """The MoE FFN: router, balancing, experts and dispatch."""

    num_experts: int = 32
    top_k: int = 2
    ffn_hidden_size: int = 8192  # per expert; smaller values + more experts = fine-grained
    router: str = "attention"  # "attention" (the paper's) | "linear" (classical)
    # "token_choice": each token takes its top_k experts (the paper). "expert_choice" (Zhou et al., 2022): each
    # expert takes the ceil(capacity_factor · T · top_k / num_experts) tokens of the micro-batch's T that score it
    # highest (capacity_factor null = 1: token choice's compute); balanced by construction, not causal.
    router_mode: str = "token_choice"
    # "topk_softmax": top-k of the logits, softmax over the k (Megatron / vLLM / paper).
    # "softmax_topk": softmax over all experts, top-k, renormalise if norm_topk_prob (Yuan HF).
    router_order: str = "topk_softmax"
    norm_topk_prob: bool = True
    noisy_gating: bool = False  # noisy top-k gating (Shazeer et al.): learned noise at train time
    aux_loss_coeff: float = 0.0  # Switch/GShard load-balancing loss
    z_loss_coeff: float = 0.0  # router z-loss (ST-MoE)
    aux_free_bias: bool = False  # DeepSeek-V3 bias that only affects expert selection
    aux_free_bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None  # None = dropless (the paper's run)
    num_shared_experts: int = 0  # always-on experts (Qwen1.5-MoE style)
    shared_expert_ffn_hidden_size: int = 0  # 0 = same as ffn_hidden_size
    shared_expert_gate: bool = False  # scale the shared experts by sigmoid(w · x) per token (Qwen1.5-MoE)
    grouped_gemm: str = "auto"  # "auto" (grouped GEMM on CUDA) | "on" | "off"


@dataclass
class ParallelConfig:
    """Process grid: world = pp * dp; expert parallelism lives inside dp (ep divides dp)."""

    pp: int = 1
    ep: int = 1
    # "1f1b" | "interleaved_1f1b" | "interleaved_zero_bubble" | "zbv_zero_bubble" | "dualpipev" (docs/parallelism.md)
    schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved: any; zbv / dualpipev: 2, in a V)
    # Layers per stage (megamoe.parallel.balance): "even" (L / stages each) | "auto" (the split that
    # balances the cost model: the last stage also runs the output head and the loss).
    stage_balance: str = "even"
    layers_per_stage: Optional[list[int]] = None  # or an explicit split, one entry per stage (pp × virtual_stages)
    # Reduce each gradient bucket as soon as its gradients are final, during the last backward
    # (megamoe.parallel.grads.GradSync); false waits for the whole backward. Same result either way.
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 25.0  # gradient bucket size: one all-reduce each (Megatron's --ddp-bucket-size)
    collective_timeout_s: int = 600
    backend: str = "auto"  # "auto" (nccl with CUDA, else gloo) | "nccl" | "gloo"


@dataclass
class DataSourceConfig:
    """One tokenized dataset prefix (path without _document suffix handling) in the blend."""

    path: str = "???"
    weight: float = 1.0
    lang: str = "all"
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5


@dataclass
class TokenizerConfig:
    type: str = "ByteTokenizer"  # ByteTokenizer | HuggingFaceTokenizer | SentencePieceTokenizer
    model: Optional[str] = None
    eod_token: Optional[str] = None


@dataclass
class DataConfig:
    """Where samples come from. kind "mock" needs no files (deterministic random tokens)."""

    kind: str = "indexed"  # "indexed" | "mock"
    sources: list[DataSourceConfig] = field(default_factory=list)
    split: str = "98,1,1"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: Optional[str] = None  # where index .npy files go; default next to the data
    reset_position_ids: bool = False


@dataclass
class SpikeConfig:
    """Loss-spike rollback (megamoe.train.spikes; PaLM's recipe): off by default."""

    enabled: bool = False
    window: int = 100  # recent healthy steps whose loss gives the running mean and standard deviation
    sigmas: float = 6.0  # a loss above mean + sigmas · std (or not finite) is suspicious ...
    patience: int = 1  # ... and this many suspicious steps in a row roll back to the checkpoint before them
    skip_batches: int = 0  # global batches skipped beyond those read since that checkpoint
    max_rollbacks: int = 5  # more than this in one run stops it: the problem is not one batch


@dataclass
class MuonConfig:
    """Muon for the hidden weight matrices (train.optimizer=muon; megamoe.train.muon, docs/optimizer.md)."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton–Schulz iterations per update
    # The update's scale per A×B matrix: "match_rms_adamw" (Moonlight: 0.2·√max(A, B), so AdamW's lr and
    # weight decay carry over) | "original" (Keller Jordan: √max(1, A/B), for a Muon-tuned lr) | "none" (1)
    adjust_lr: str = "match_rms_adamw"


@dataclass
class TrainConfig:
    """Optimisation: batch, schedule, optimizer, precision, and what to do with non-finite steps."""

    steps: int = 318000
    global_batch: int = 1536
    micro_batch: int = 2
    seq_len: int = 4096
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 6400
    decay: str = "cosine"  # "cosine" | "linear" | "constant"
    decay_steps: Optional[int] = None  # None = steps
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # "adamw" | "muon": Muon on the hidden matrices, AdamW (beta1, beta2, eps above) on embeddings, head, norms, biases
    optimizer: str = "adamw"
    muon: MuonConfig = field(default_factory=MuonConfig)
    optimizer_state_dtype: str = "fp32"  # "fp32" | "bf16": AdamW's moments / Muon's momentum (weights stay fp32)
    clip_grad: float = 1.0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    activation_checkpointing: str = "none"  # "none" | "full" | "selective"
    compile: str = "none"  # "none" | "block": torch.compile each layer's fixed-shape blocks (megamoe.nn.compile)
    on_nonfinite: str = "skip"  # "skip" | "stop"
    max_skipped_steps: int = 10  # with skip: this many skipped steps in a row stop the run (it diverged)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10


@dataclass
class EvalConfig:
    """Downstream tasks scored during training (megamoe.train.downstream, docs/evaluation.md); the
    validation loss has its own keys, train.eval_interval and train.eval_iters."""

    downstream_interval: int = 0  # score every this many steps and at the last; 0 = off
    downstream_tasks: list[str] = field(default_factory=list)  # built-in names (demo-zh, ...), .jsonl files, directories
    downstream_limit: Optional[int] = None  # the first N items of each task; null = all
    downstream_fewshot: int = 0  # solved examples put before each item, drawn from the task's other items by seed
    downstream_max_new_tokens: int = 256  # greedy tokens for generation items that set no max_new_tokens


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep: int = 3
    resume: str = "auto"  # "auto" | "none" | a checkpoint path
    # Resume even though the data stream changed (train.seq_len, data.sources, data.split, seed):
    # training continues at the same consumed-sample count of the new stream.
    allow_data_change: bool = False
    # Write in the background while training goes on (`checkpoint.async` on the command line:
    # `async` is a Python keyword, so the field is spelled out here).
    asynchronous: bool = False
    on_error: str = "continue"  # a save that fails: "continue" (say so loudly, retry next interval) | "stop"


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "megamoe"
    mode: str = "offline"  # "offline" | "online" | "disabled"


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    expert_load: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "megamoe"


@dataclass
class MegaMoEConfig:
    """The root: every key a run can set. `+exp=NAME` overlays configs/exp/NAME.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 1234


def as_object(cfg: DictConfig | MegaMoEConfig) -> MegaMoEConfig:
    """The config as plain dataclasses: attribute reads ~7× faster than a DictConfig's, and
    ``dataclasses.replace`` makes variants in microseconds (for code that evaluates thousands)."""
    return OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg  # type: ignore[return-value]


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore so configs/config.yaml can extend it."""
    cs = ConfigStore.instance()
    cs.store(name="megamoe_schema", node=MegaMoEConfig)
