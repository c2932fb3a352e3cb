"""Cross-field validation: impossible combinations stop before any process group starts.

Types and unknown keys are already enforced by the structured schema; here we check what a
dataclass cannot express (ranges, enumerations, divisibility). Each failure is one
:class:`ConfigError` line of the form ``key: what is wrong (how to fix it)``. A model family's
own rules come on top (megamoe.models.validate_config runs both): this module knows no family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megamoe.config.choices import V_SCHEDULES, Choice, DataKind, Optimizer, Router, RouterMode, Schedule, StageBalance
from megamoe.config.layers import moe_layer_flags
from megamoe.config.schema import Config, MegaMoEConfig, MuonConfig, rotary_dim
from megamoe.errors import ConfigError


def _choice_keys(schema: type, prefix: str = "") -> dict[str, type[Choice]]:
    """Every key whose schema field names its options (megamoe.config.choices), by dotted name."""
    keys: dict[str, type[Choice]] = {}
    for f in dataclasses.fields(schema):
        if "choices" in f.metadata:
            keys[prefix + f.name] = f.metadata["choices"]
        elif dataclasses.is_dataclass(f.default_factory):
            keys.update(_choice_keys(f.default_factory, f"{prefix}{f.name}."))
    return keys


CHOICES: dict[str, type[Choice]] = _choice_keys(MegaMoEConfig)

POSITIVE: tuple[str, ...] = (
    "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads", "model.head_dim",
    "model.max_position_embeddings", "model.dense_ffn_hidden_size", "model.rms_norm_eps", "model.init_std",
    "model.rotary_base", "moe.num_experts", "moe.top_k", "moe.ffn_hidden_size", "parallel.pp", "parallel.ep",
    "parallel.virtual_stages", "parallel.grad_bucket_mb", "parallel.collective_timeout_s", "train.steps",
    "train.global_batch", "train.micro_batch", "train.seq_len", "train.lr", "train.log_interval", "train.eval_interval",
    "train.eval_iters", "train.max_skipped_steps", "train.spike.window", "train.spike.sigmas", "train.spike.patience",
    "train.spike.max_rollbacks", "train.muon.ns_steps", "checkpoint.interval", "checkpoint.keep",
    "eval.downstream_max_new_tokens",
)

NON_NEGATIVE: tuple[str, ...] = (
    "moe.aux_loss_coeff", "moe.z_loss_coeff", "moe.aux_free_bias_update_rate", "moe.num_shared_experts",
    "moe.shared_expert_ffn_hidden_size", "train.min_lr", "train.warmup_steps", "train.weight_decay",
    "train.eps", "train.clip_grad", "train.spike.skip_batches", "eval.downstream_interval", "eval.downstream_fewshot",
)


def _get(cfg: Config, dotted: str) -> Any:
    """``cfg.a.b`` for ``"a.b"``: by attribute, so plain schema objects validate too (the planner's)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _validate_model(cfg: Config) -> None:
    m = cfg.model
    _check(m.hidden_size % m.num_heads == 0, "model.hidden_size",
           f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _check(0.0 < m.rotary_percent <= 1.0, "model.rotary_percent",
           f"{m.rotary_percent} gives rotary dim {rotary_dim(m)} > model.head_dim={m.head_dim}; use a value in (0, 1]")
    _check(rotary_dim(m) % 2 == 0 and rotary_dim(m) > 0, "model.rotary_percent",
           f"rotary dim {rotary_dim(m)} (head_dim × rotary_percent) must be a positive even number")
    _check(cfg.train.seq_len <= m.max_position_embeddings, "train.seq_len",
           f"{cfg.train.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")


def _validate_moe(cfg: Config) -> None:
    e = cfg.moe
    moe_layer_flags(cfg.model, e)  # moe.layer_freq names the layers it makes MoE
    _check(e.top_k <= e.num_experts, "moe.top_k", f"{e.top_k} > moe.num_experts={e.num_experts}")
    _check(e.capacity_factor is None or e.capacity_factor > 0, "moe.capacity_factor",
           f"{e.capacity_factor} must be > 0, or null for dropless dispatch")
    _check(not (e.noisy_gating and e.router != Router.LINEAR), "moe.noisy_gating",
           "noisy top-k gating applies to the linear router only; set moe.router=linear")
    _check(not e.shared_expert_gate or e.num_shared_experts > 0, "moe.shared_expert_gate",
           "true gates the shared experts, but moe.num_shared_experts=0; set it >= 1 or the gate to false")
    if e.router_mode == RouterMode.EXPERT_CHOICE:  # every expert takes the same number of tokens: nothing to balance
        _check(e.aux_loss_coeff == 0, "moe.aux_loss_coeff", f"{e.aux_loss_coeff}: the Switch loss is constant "
               "under moe.router_mode=expert_choice, whose load is balanced by construction; set it to 0")
        _check(not e.aux_free_bias, "moe.aux_free_bias", "true: the bias steers token choice only, and "
               "moe.router_mode=expert_choice is balanced by construction; set it to false")


def _validate_split(cfg: Config) -> None:
    """Every one of the pp × virtual_stages stages gets at least one layer, and they add up to the model."""
    p, num_layers = cfg.parallel, cfg.model.num_layers
    stages = p.pp * p.virtual_stages
    if p.layers_per_stage is None:
        _check(num_layers >= stages, "model.num_layers",
               f"{num_layers} layers cannot fill parallel.pp × parallel.virtual_stages = {stages} stages; "
               "every stage needs at least one")
        _check(p.stage_balance != StageBalance.EVEN or num_layers % stages == 0, "model.num_layers",
               f"{num_layers} layers cannot be split into parallel.pp × parallel.virtual_stages = {stages} equal "
               "stages; set parallel.stage_balance=auto or list parallel.layers_per_stage")
        return
    layers = list(p.layers_per_stage)
    key = "parallel.layers_per_stage"
    _check(p.stage_balance == StageBalance.EVEN, key,
           f"{layers} and parallel.stage_balance={p.stage_balance} both choose the split; set only one")
    _check(len(layers) == stages, key, f"{layers} has {len(layers)} entries, but parallel.pp × "
                                       f"parallel.virtual_stages = {stages} stages need one each")
    for stage, count in enumerate(layers):
        _check(count > 0, key, f"{layers} gives stage {stage} {'no layer' if count == 0 else f'{count} layers'}; "
                               "every stage needs at least one")
    _check(sum(layers) == num_layers, key,
           f"{layers} adds up to {sum(layers)} layers, but model.num_layers={num_layers}")


def _validate_parallel(cfg: Config) -> None:
    p = cfg.parallel
    _check(p.schedule != Schedule.ONE_F_ONE_B or p.virtual_stages == 1, "parallel.virtual_stages",
           f"{p.virtual_stages} virtual stages need a multi-stage parallel.schedule (interleaved_1f1b, "
           "interleaved_zero_bubble, or with exactly 2: zbv_zero_bubble, dualpipev)")
    _check(p.schedule not in V_SCHEDULES or p.virtual_stages == 2, "parallel.virtual_stages",
           f"{p.virtual_stages}: parallel.schedule={p.schedule} places exactly two stages on each rank, in a V; "
           "set parallel.virtual_stages=2")
    _validate_split(cfg)
    _check(cfg.moe.num_experts % p.ep == 0, "moe.num_experts",
           f"{cfg.moe.num_experts} experts cannot be divided among parallel.ep={p.ep} ranks")


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    _check(t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} > train.lr={t.lr}")
    _check(t.warmup_steps <= t.steps, "train.warmup_steps", f"{t.warmup_steps} > train.steps={t.steps}")
    _check(t.global_batch % t.micro_batch == 0, "train.global_batch",
           f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    _validate_muon(cfg)


def _validate_muon(cfg: Config) -> None:
    """Muon's keys mean something only under train.optimizer=muon: set under adamw, they are a mistake."""
    t = cfg.train
    if t.optimizer != Optimizer.MUON:
        for key, default in vars(MuonConfig()).items():
            value = getattr(t.muon, key)
            _check(value == default, f"train.muon.{key}", f"{value} has no meaning with train.optimizer={t.optimizer} "
                   "(it is Muon's); set train.optimizer=muon, or remove the key")
        return
    _check(0 <= t.muon.momentum < 1, "train.muon.momentum", f"{t.muon.momentum} must be in [0, 1)")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.kind == DataKind.INDEXED:
        _check(len(d.sources) > 0, "data.sources",
               "is empty; list [{path, weight, lang}] entries, or use data=mock for random tokens")
    for i, src in enumerate(d.sources):
        _check(src.weight > 0, f"data.sources[{i}].weight", f"{src.weight} must be > 0")
        _check(0.0 <= src.fim_rate <= 1.0, f"data.sources[{i}].fim_rate", f"{src.fim_rate} must be in [0, 1]")
    _check(not (d.reset_attention_mask and d.kind == DataKind.MOCK), "data.reset_attention_mask",
           "true needs end-of-document tokens to find the documents, but data.kind=mock has none; "
           "train on indexed data or set it to false")
    parts = d.split.replace("/", ",").split(",")
    ok = len(parts) == 3 and all(x.strip().replace(".", "", 1).isdigit() for x in parts)
    _check(ok and sum(float(x) for x in parts) > 0, "data.split",
           f"'{d.split}' must be three non-negative numbers like '98,1,1' (train, valid, test)")


def _validate_eval(cfg: Config) -> None:
    """Downstream evaluation has tasks (their files and generation lengths are checked when the
    run reads them: megamoe.train.downstream)."""
    e = cfg.eval
    if e.downstream_interval == 0:
        return
    _check(len(e.downstream_tasks) > 0, "eval.downstream_tasks",
           "is empty; list task names or files (e.g. [demo-zh, demo-en]), or set eval.downstream_interval=0")
    _check(e.downstream_limit is None or e.downstream_limit > 0, "eval.downstream_limit",
           f"{e.downstream_limit} must be > 0, or null for every item")


def validate_layout(cfg: Config, world_size: int) -> int:
    """Check that ``world_size`` processes fit the grid; returns the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    _check(world_size % p.pp == 0, "parallel.pp",
           f"world size {world_size} is not divisible by parallel.pp={p.pp}")
    dp = world_size // p.pp
    _check(dp % p.ep == 0, "parallel.ep",
           f"{p.ep} does not divide the data-parallel size {dp} (world {world_size} / pp {p.pp})")
    _check(t.global_batch % (t.micro_batch * dp) == 0, "train.global_batch",
           f"{t.global_batch} is not divisible by train.micro_batch × dp = {t.micro_batch} × {dp}")
    if p.pp > 1:
        _validate_microbatches(cfg, t.global_batch // (t.micro_batch * dp))
    return dp


def _validate_microbatches(cfg: Config, microbatches: int) -> None:
    """What torch's multi-stage schedules need of the micro-batches each data-parallel rank runs per step."""
    p, key = cfg.parallel, "train.global_batch"
    per_rank = f"{cfg.train.global_batch} gives {microbatches} micro-batches per data-parallel rank"
    if p.schedule in (Schedule.INTERLEAVED_1F1B, Schedule.INTERLEAVED_ZERO_BUBBLE):
        rounds = max(1, microbatches // p.pp)
        _check(microbatches % rounds == 0, key, f"{per_rank}, which parallel.schedule={p.schedule} cannot split "
               f"into max(1, m // parallel.pp) = {rounds} equal rounds; use e.g. at most pp, or a multiple of pp")
    if p.schedule == Schedule.DUALPIPEV:
        _check(microbatches >= 2 * p.pp, key, f"{per_rank}; parallel.schedule=dualpipev needs at least one per "
               f"stage, 2 × parallel.pp = {2 * p.pp}")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Raise ConfigError naming the first impossible setting; silent when all is well."""
    for key, options in CHOICES.items():
        value = _get(cfg, key)
        _check(value in options.values(), key, f"'{value}' is not one of {', '.join(options.values())}")
    for key in POSITIVE:
        _check(_get(cfg, key) > 0, key, f"{_get(cfg, key)} must be > 0")
    for key in NON_NEGATIVE:
        _check(_get(cfg, key) >= 0, key, f"{_get(cfg, key)} must be >= 0")
    _validate_model(cfg)
    _validate_moe(cfg)
    _validate_parallel(cfg)
    _validate_train(cfg)
    _validate_data(cfg)
    _validate_eval(cfg)
    if world_size is not None:
        validate_layout(cfg, world_size)
