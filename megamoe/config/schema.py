"""Typed configuration schema: one dataclass per section, registered in Hydra's ConfigStore.

Structured configs make OmegaConf reject unknown keys and wrong types at composition time,
so a typo in an override fails at startup with the key's name instead of being ignored.
Cross-field rules (divisibility, ranges) live in :mod:`megamoe.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar, overload

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megamoe.config.choices import (
    Backend,
    Choice,
    Compile,
    DataKind,
    Decay,
    FfnType,
    MuonAdjustLr,
    OnError,
    OnNonFinite,
    Optimizer,
    Precision,
    Recompute,
    Router,
    RouterMode,
    RouterOrder,
    Schedule,
    StageBalance,
    StateDtype,
    Switch,
    TokenizerType,
    WandbMode,
)


def choice(default: Choice) -> Any:
    """A field taking one of ``default``'s enum's options (validation checks it against them)."""
    return field(default=default.value, metadata={"choices": type(default)})


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
    ffn_type: str = choice(FfnType.MOE)  # moe: the layers moe.layer_freq selects are MoE (all by default)
    dense_ffn_hidden_size: int = 8192  # the dense SwiGLU's width: every layer of a dense model, moe.layer_freq's 0s
    init_std: float = 0.02


@dataclass
class MoEConfig:
    """The MoE FFN: router, balancing, experts and dispatch."""

    num_experts: int = 32
    top_k: int = 2
    ffn_hidden_size: int = 8192  # per expert; smaller values + more experts = fine-grained
    router: str = choice(Router.ATTENTION)
    # expert_choice: each expert takes the ceil(capacity_factor · T · top_k / num_experts) tokens of the
    # micro-batch's T that score it highest (capacity_factor null = 1: token choice's compute); balanced by
    # construction, not causal.
    router_mode: str = choice(RouterMode.TOKEN_CHOICE)
    router_order: str = choice(RouterOrder.TOPK_SOFTMAX)  # softmax_topk renormalises if norm_topk_prob
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
    grouped_gemm: str = choice(Switch.AUTO)  # auto: the grouped GEMM on CUDA
    # Which layers are MoE (megamoe.config.layers; Megatron's --moe-layer-freq): an int N, layer i when
    # i % N == 0 (1: all); or one 0 / 1 per layer, also as Megatron's '([0]*3+[1]*9)'. The others get
    # the dense SwiGLU of model.dense_ffn_hidden_size.
    layer_freq: Any = 1


@dataclass
class ParallelConfig:
    """Process grid: world = pp * dp; expert parallelism lives inside dp (ep divides dp)."""

    pp: int = 1
    ep: int = 1
    schedule: str = choice(Schedule.ONE_F_ONE_B)  # docs/parallelism.md
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved: any; zbv / dualpipev: 2, in a V)
    # Layers per stage (megamoe.estimators.balance): even (L / stages each) | auto (the split that
    # balances the cost model: the last stage also runs the output head and the loss).
    stage_balance: str = choice(StageBalance.EVEN)
    layers_per_stage: Optional[list[int]] = None  # or an explicit split, one entry per stage (pp × virtual_stages)
    # Reduce each gradient bucket as soon as its gradients are final, during the last backward
    # (megamoe.parallel.grads.GradSync); false waits for the whole backward. Same result either way.
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 25.0  # gradient bucket size: one all-reduce each (Megatron's --ddp-bucket-size)
    collective_timeout_s: int = 600
    backend: str = choice(Backend.AUTO)  # auto: nccl with CUDA, else gloo


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
    type: str = choice(TokenizerType.BYTE)
    model: Optional[str] = None
    eod_token: Optional[str] = None


@dataclass
class DataConfig:
    """Where samples come from. kind "mock" needs no files (deterministic random tokens)."""

    kind: str = choice(DataKind.INDEXED)
    sources: list[DataSourceConfig] = field(default_factory=list)
    split: str = "98,1,1"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: Optional[str] = None  # where index .npy files go; default next to the data
    reset_position_ids: bool = False  # position ids restart at 0 after each end-of-document token
    # No token attends across an end-of-document token (nor does Yuan's LFA filter look across it): each
    # document of a packed sample computes what it computes alone (megamoe.nn.documents, docs/data.md).
    reset_attention_mask: bool = False


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
    adjust_lr: str = choice(MuonAdjustLr.MATCH_RMS_ADAMW)  # the update's scale per A×B matrix


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
    decay: str = choice(Decay.COSINE)
    decay_steps: Optional[int] = None  # None = steps
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # muon: Muon on the hidden matrices, AdamW (beta1, beta2, eps above) on embeddings, head, norms, biases
    optimizer: str = choice(Optimizer.ADAMW)
    muon: MuonConfig = field(default_factory=MuonConfig)
    optimizer_state_dtype: str = choice(StateDtype.FP32)  # AdamW's moments / Muon's momentum (weights stay fp32)
    clip_grad: float = 1.0
    precision: str = choice(Precision.AUTO)  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: str = choice(Recompute.NONE)
    compile: str = choice(Compile.NONE)  # block: torch.compile each layer's fixed-shape blocks (megamoe.nn.compile)
    on_nonfinite: str = choice(OnNonFinite.SKIP)
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
    # built-in names (demo-zh, ...), .jsonl files, directories
    downstream_tasks: list[str] = field(default_factory=list)
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
    on_error: str = choice(OnError.CONTINUE)  # a failed save: continue (say so loudly, retry next interval) | stop


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "megamoe"
    mode: str = choice(WandbMode.OFFLINE)


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # the scalars of metrics.jsonl / eval.jsonl / downstream.jsonl into run.dir/tensorboard


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
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


# What code that only reads a config takes: the composed config (a DictConfig over the schema)
# or its plain copy (as_object), which reads faster.
Config = DictConfig | MegaMoEConfig
SectionT = TypeVar("SectionT")


@overload
def as_object(cfg: DictConfig | MegaMoEConfig) -> MegaMoEConfig: ...
@overload
def as_object(cfg: DictConfig | SectionT, kind: type[SectionT]) -> SectionT: ...
def as_object(cfg: Any, kind: Optional[type] = None) -> Any:
    """The config as plain dataclasses: attribute reads ~7× faster than a DictConfig's, and
    ``dataclasses.replace`` makes variants in microseconds (for code that evaluates thousands).
    A section of it (``cfg.model``) names its dataclass as ``kind`` (``ModelConfig``)."""
    plain = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    assert kind is None or isinstance(plain, kind), f"a {type(plain).__name__}, not a {kind.__name__}"
    return plain


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore so configs/config.yaml can extend it."""
    cs = ConfigStore.instance()
    cs.store(name="megamoe_schema", node=MegaMoEConfig)


def rotary_dim(model: ModelConfig) -> int:
    """Dims of each head that get RoPE: head_dim × rotary_percent (Yuan M32: 0.5 × 256 = 128)."""
    return int(model.head_dim * model.rotary_percent)
