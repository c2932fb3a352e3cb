"""A running job ↔ a checkpoint: what each rank holds under which global names, and resuming.

Every tensor a rank holds has a *placement*: its global name(s) in the checkpoint. Dense tensors
are replicated over the data-parallel ranks of their stage and expert banks over the
expert-data-parallel ranks of their ep rank; each replica writes a share of them
(:func:`written_names`), and the last stage's copy of a tied embedding is never written (it
equals ``embed.weight``). On load every rank reads exactly the names its placements list, from
whichever files hold them — so a checkpoint written by one (dp, pp, ep) loads into any other,
optimizer state included. Saving itself is megamoe.checkpoint.saver.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, cast

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from megamoe.checkpoint.names import expert_bank_names, expert_tensor_name, model_tensor_shapes
from megamoe.checkpoint.store import (
    LATEST,
    MANIFEST,
    Manifest,
    checkpoint_dir,
    complete_checkpoints,
    latest_target,
    read_config,
    read_manifest,
    read_shard,
    read_verified,
    resume_candidates,
    set_aside,
    step_of,
)
from megamoe.config.choices import FfnType
from megamoe.data.loader import stream_change
from megamoe.errors import CheckpointError, SharedError, UserError
from megamoe.nn.decoder import Decoder
from megamoe.nn.init import init_key_seed
from megamoe.parallel.expert import expert_range
from megamoe.parallel.mesh import ProcessGrid, first_error

# The train.* settings that decide what a checkpoint's optimizer state is → (their value in checkpoints
# from before the setting existed, why a run with another value cannot resume from it).
OPTIMIZER_KIND = {"optimizer": ("adamw", "AdamW keeps two moments per matrix, Muon one momentum"),
                  "optimizer_state_dtype": ("fp32", "the state would change precision in the middle of the run")}


class Stateful(Protocol):
    """A part of the job that saves and restores its own position (the data loader)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """What a checkpoint saves of a running job and restores into it: this rank's stage models
    (in stage order), the optimizer, the data position, the step, and the run config (saved with
    the checkpoint; its checkpoint, run and data settings steer saving and resuming)."""

    cfg: DictConfig
    grid: ProcessGrid
    models: Sequence[Decoder]
    optimizer: torch.optim.Optimizer
    data: Stateful
    data_stream: dict[str, Any]  # what fixes the sample order (megamoe.data.loader.data_stream)
    step: int = 0


@dataclass(frozen=True)
class Placement:
    """Where one local parameter or buffer lives in the checkpoint's global namespace.

    ``names`` holds one global name, or for an expert bank one per local expert (``tensor[i]``
    is expert ``names[i]``). A ``copy`` (a last stage's copy of a tied embedding) is never
    written: its original is.
    """

    tensor: Tensor
    names: tuple[str, ...]
    bank: bool
    copy: bool = False

    def pieces(self, value: Tensor) -> list[tuple[str, Tensor]]:
        """``value`` (the tensor itself, or optimizer state shaped like it) under global names.

        A bank's scalar state (Adam's step count) is shared by its experts: stored once per expert.
        """
        if not self.bank:
            return [(self.names[0], value)]
        if value.shape == self.tensor.shape:
            return list(zip(self.names, value.unbind(0)))
        return [(name, value) for name in self.names]

    def assemble(self, pieces: list[Tensor]) -> Tensor:
        """The inverse of :meth:`pieces` for one state value read back from a checkpoint."""
        if self.bank and pieces[0].shape == self.tensor.shape[1:]:
            return torch.stack(pieces)
        return pieces[0]


def placements(state: TrainingState) -> list[Placement]:
    """Every parameter and persistent buffer of this rank's stages, with its global names.

    Expert banks and tied copies are what the modules declare them to be (an ExpertBank; a
    stage model's ``tied_copies()``), whatever they are called.
    """
    cfg, grid = state.cfg, state.grid
    experts = expert_range(cfg.moe.num_experts, grid.ep, grid.ep_rank)
    result = []
    for model in state.models:
        banks, copies = expert_bank_names(model), model.tied_copies()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in banks:
                result.append(Placement(tensor, tuple(expert_tensor_name(name, e) for e in experts), bank=True))
            elif name in copies:  # a last stage's copy of the tied embedding: stored once, as the original
                result.append(Placement(tensor, (copies[name],), bank=False, copy=True))
            else:
                result.append(Placement(tensor, (name,), bank=False))
    return result


def _share(sizes: dict[str, int], replicas: int) -> list[set[str]]:
    """Names split over ``replicas`` writers: largest first, each to the least-loaded (ties: the
    lowest index) — the same on every replica, which all hold the same names and sizes."""
    loads = [0] * replicas
    shares: list[set[str]] = [set() for _ in range(replicas)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        writer = loads.index(min(loads))
        loads[writer] += size
        shares[writer].add(name)
    return shares


def written_names(places: list[Placement], grid: ProcessGrid) -> set[str]:
    """The global names this rank writes. A stage's dense tensors are replicated over its dp
    ranks and an expert over its edp ranks: each replica writes a share, so no byte is written
    twice and a save's time falls as dp grows (checkpoints stay layout-independent)."""
    dense = {place.names[0]: place.tensor.numel() * place.tensor.element_size()
             for place in places if not place.bank and not place.copy}
    experts = {name: place.tensor[0].numel() * place.tensor.element_size()
               for place in places if place.bank for name in place.names}
    return _share(dense, grid.dp)[grid.dp_rank] | _share(experts, grid.edp)[grid.edp_rank]


def checkpoint_root(state: TrainingState) -> Path:
    return Path(state.cfg.run.dir) / "checkpoints"


def log(state: TrainingState, message: str) -> None:
    if state.grid.rank == 0:
        print(f"checkpoint: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# What a save writes (megamoe.checkpoint.saver writes it)


def model_pieces(places: list[Placement], mine: set[str]) -> list[tuple[str, Tensor]]:
    """The model tensors this rank writes, under their global names (views, not copies). A tied
    copy never: its original is written (a V schedule's rank 0 holds both)."""
    return [(name, piece) for place in places if not place.copy
            for name, piece in place.pieces(place.tensor.detach()) if name in mine]


def optimizer_pieces(optimizer: torch.optim.Optimizer, places: list[Placement],
                     mine: set[str]) -> list[tuple[str, Tensor]]:
    """The optimizer's state (AdamW's exp_avg / exp_avg_sq / step, Muon's momentum_buffer: whatever
    it keeps) as ``{key}/{global name}``, for the tensors this rank writes."""
    pieces = []
    for place in (place for place in places if not place.copy):  # as model_pieces
        for key, value in optimizer.state.get(place.tensor, {}).items():
            if torch.is_tensor(value):
                pieces += [(f"{key}/{name}", piece) for name, piece in place.pieces(value.detach()) if name in mine]
    return pieces


def optimizer_kind(cfg: DictConfig) -> dict[str, str]:
    """The settings that decide what a checkpoint's optimizer state is (recorded in its manifest)."""
    return {key: cfg.train[key] for key in OPTIMIZER_KIND}


def rng_bytes() -> bytes:
    """This rank's RNG states (torch CPU and CUDA, Python, NumPy), as a weights-only torch file."""
    # the legacy (MT19937) state tuple: numpy types get_state() as that tuple or a dict
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),  # plain ints, like Python's (and a fake step's)
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _restore_rng(data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=True)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # a list, or a tensor


def layout_of(state: TrainingState) -> dict[str, int]:
    g = state.grid
    return {"world_size": g.world_size, "pp": g.pp, "dp": g.dp, "ep": g.ep,
            "virtual_stages": state.cfg.parallel.virtual_stages}


def first_nonfinite(pieces: list[tuple[str, Tensor]]) -> Optional[str]:
    """Name of the first of ``pieces`` (a rank's written share, see :func:`model_pieces` and
    :func:`optimizer_pieces`) holding a NaN or Inf. The ranks' shares cover every tensor.

    A tensor's sum screens it (NaN and Inf propagate into it) at a tenth of the cost of
    ``isfinite`` over every element, which then confirms: only a sum that overflowed could pass
    the screen wrongly, and that is caught by the confirmation."""
    return next((name for name, value in pieces
                 if value.is_floating_point() and not bool(value.sum().isfinite())
                 and not bool(torch.isfinite(value).all())), None)


# ---------------------------------------------------------------------------------------------
# Load


def _check_names(manifest: Manifest, state: TrainingState, ckpt_dir: Path) -> None:
    """The checkpoint holds exactly the configured model's tensors (shapes are checked on copy)."""
    stored = {t for name in manifest.files_of_kind("model") for t in manifest.files[name].tensors}
    expected = set(model_tensor_shapes(state.cfg))
    for what, names in (("is missing", expected - stored),
                        ("is not a parameter of the configured model", stored - expected)):
        if names:
            raise CheckpointError(f"{ckpt_dir}: tensor {sorted(names)[0]} {what} "
                                  f"({len(names)} such; was it saved with another model config?)")


def _load_model(state: TrainingState, ckpt_dir: Path, manifest: Manifest, places: list[Placement]) -> None:
    where = manifest.tensor_files()
    targets: dict[str, list[tuple[str, Tensor]]] = defaultdict(list)  # file → (name, destination)
    for place in places:
        for name, destination in place.pieces(place.tensor.data):
            targets[where[name]].append((name, destination))
    for file in targets:  # one verified file in memory at a time
        tensors = read_shard(ckpt_dir / file, manifest.files[file])
        for name, destination in targets[file]:
            source = tensors[name]
            if source.shape != destination.shape:
                raise CheckpointError(f"{ckpt_dir / file}: tensor {name} has shape {list(source.shape)}, "
                                      f"the configured model needs {list(destination.shape)}")
            destination.copy_(source)


def _load_optimizer(state: TrainingState, ckpt_dir: Path, manifest: Manifest, places: list[Placement]) -> None:
    """Rebuild this rank's optimizer state from the global names, then ``load_state_dict``."""
    optimizer = state.optimizer
    where = manifest.tensor_files()
    keys = sorted({name.split("/", 1)[0] for name in where if "/" in name})  # exp_avg, exp_avg_sq, step
    index = {p: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    owned = [place for place in places if place.tensor in index]  # parameters, not buffers
    needed: dict[str, list[str]] = defaultdict(list)  # file → state tensor names
    for place in owned:
        for name in (f"{key}/{n}" for key in keys for n in place.names):
            if name in where:
                needed[where[name]].append(name)
    values: dict[str, Tensor] = {}
    for file in needed:
        tensors = read_shard(ckpt_dir / file, manifest.files[file])
        values.update({name: tensors[name] for name in needed[file]})
    loaded: dict[int, dict[str, Any]] = {}
    for place in owned:
        entry = {key: place.assemble([values[f"{key}/{n}"] for n in place.names])
                 for key in keys if f"{key}/{place.names[0]}" in values}
        if entry:  # a parameter never stepped (all updates skipped so far) has no state yet
            loaded[index[place.tensor]] = entry
    packed = optimizer.state_dict()
    packed["state"] = loaded
    for group, step in zip(packed["param_groups"], manifest.state["optimizer_group_steps"]):
        if step is not None:
            group["step"] = step
    optimizer.load_state_dict(packed)


def _check_optimizer(state: TrainingState, ckpt_dir: Path, manifest: Manifest) -> None:
    """The optimizer state resumes only into the optimizer, and the state dtype, that wrote it."""
    wanted = optimizer_kind(state.cfg)
    for key, (default, why) in OPTIMIZER_KIND.items():
        saved = manifest.state.get(key, default)
        if saved != wanted[key]:
            raise SharedError(f"{ckpt_dir}: its optimizer state was written with train.{key}={saved}, which "
                              f"train.{key}={wanted[key]} cannot continue from ({why}); set train.{key}={saved} "
                              "to resume this run, or start a new one (checkpoint.resume=none, or another run.dir)")


def _check_data_stream(state: TrainingState, ckpt_dir: Path, manifest: Manifest) -> None:
    """Resume only into the same sample stream, unless checkpoint.allow_data_change says otherwise.

    The global batch may change: the next step starts at the same consumed sample (Megatron's
    rule), so no sample is repeated or skipped. ``data.reset_attention_mask`` may change too (a
    phase that starts masking documents): the weights fit either, and the log says so.
    """
    saved, cfg = manifest.state, state.cfg
    consumed = saved["loader"]["consumed_samples"]
    change = stream_change(saved.get("data_stream", state.data_stream), state.data_stream)
    if change is not None and not cfg.checkpoint.allow_data_change:
        raise SharedError(f"{ckpt_dir}: the training data stream changed since this checkpoint ({change}), so the run "
                          f"would read other samples than it was going to; restore the setting, or set "
                          f"checkpoint.allow_data_change=true to continue at sample {consumed} of the new stream")
    if change is not None:
        log(state, f"the data stream changed ({change}); continuing at sample {consumed} of the new stream")
    before = saved.get("global_batch", cfg.train.global_batch)
    if before != cfg.train.global_batch:
        log(state, f"train.global_batch changed from {before} to {cfg.train.global_batch}: "
                      f"continuing at sample {consumed} of the same stream")
    masked = cfg.data.reset_attention_mask
    if saved.get("reset_attention_mask", False) != masked:  # older checkpoints: attention crossed documents
        log(state, f"data.reset_attention_mask changed to {str(masked).lower()} since this checkpoint: the weights "
                   f"carry over; attention now {'stays inside each document' if masked else 'crosses documents'}")


def _restore_rng_or_reseed(state: TrainingState, ckpt_dir: Path, manifest: Manifest) -> None:
    """Same layout: each rank gets its own RNG states back. Another layout has other ranks, so
    their streams restart from (seed, rank, step) — only noisy gating draws from them."""
    grid = state.grid
    if manifest.layout == layout_of(state):
        name = f"rng-r{grid.rank:05d}.pt"
        _restore_rng(read_verified(ckpt_dir / name, manifest.files[name]).numpy().tobytes())
    else:
        torch.manual_seed(init_key_seed(state.cfg.seed, "resume", grid.rank, state.step))
        log(state, f"layout changed from {manifest.layout} to {layout_of(state)}: weights, optimizer and data "
                      "position carry over; RNG streams restart from (seed, rank, step)")


def load_checkpoint(state: TrainingState, ckpt_dir: Path) -> Manifest:
    """Load ``ckpt_dir`` into this rank (in place). Raises CheckpointError naming a bad file.

    A model-only checkpoint (``write_model_checkpoint``) sets the weights and starts at step 0
    with a fresh optimizer.
    """
    manifest = read_manifest(ckpt_dir)
    _check_names(manifest, state, ckpt_dir)
    if manifest.has_optimizer:
        _check_optimizer(state, ckpt_dir, manifest)
    places = placements(state)
    with torch.no_grad():
        _load_model(state, ckpt_dir, manifest, places)
    if not manifest.has_optimizer:
        state.optimizer.state.clear()
        state.step = 0
        state.data.load_state_dict({"consumed_samples": 0})
        return manifest
    _check_data_stream(state, ckpt_dir, manifest)
    _load_optimizer(state, ckpt_dir, manifest, places)
    state.step = manifest.state["step"]
    state.data.load_state_dict(manifest.state["loader"])
    _restore_rng_or_reseed(state, ckpt_dir, manifest)
    return manifest


@dataclass
class ResumePlan:
    """What ``checkpoint.resume`` comes to, given what is on disk (rank 0 looks, every rank follows)."""

    candidates: list[Path]  # to try in order
    named: bool = False  # one checkpoint the user named: an error if it does not load, no fallback
    notes: list[str] = field(default_factory=list)  # said before loading
    refusal: Optional[str] = None  # nothing may be resumed: the run stops with this line


def _model_settings(cfg: DictConfig) -> dict[str, Any]:
    """The keys that define the model (``model.*``, ``moe.*``), flattened."""
    def flat(prefix: str, node: Any) -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(f"{prefix}.{key}", value).items()}
        return {prefix: node}

    return {**flat("model", OmegaConf.to_container(cfg.model)), **flat("moe", OmegaConf.to_container(cfg.moe))}


def _model_change(cfg: DictConfig, ckpt_dir: Path) -> tuple[Optional[str], Optional[str]]:
    """(a refusal, a note) for resuming ``ckpt_dir`` with the model of ``cfg``: a checkpoint of
    another shape is refused in one line saying what changed (not tried and skipped like a damaged
    one); a change that leaves every tensor's shape alone (``moe.top_k``, a loss coefficient) is
    accepted — the weights fit, the model computes with the new settings from here — and said."""
    try:
        saved_cfg = read_config(ckpt_dir)
    except CheckpointError:
        return None, None  # damaged: loading it says so, and auto falls back past it
    saved, now = _model_settings(saved_cfg), _model_settings(cfg)
    changes = [f"{key}: {saved.get(key)} → {now.get(key)}" for key in sorted(saved.keys() | now.keys())
               if saved.get(key) != now.get(key)]
    if not changes:
        return None, None
    listed = ", ".join(changes)
    if model_tensor_shapes(saved_cfg) != model_tensor_shapes(cfg):
        upcycle = (" (a dense checkpoint becomes an MoE one with launch/convert_checkpoint.py upcycle)"
                   if saved_cfg.model.ffn_type == FfnType.DENSE and cfg.model.ffn_type == FfnType.MOE else "")
        refusal = (f"checkpoint: {ckpt_dir} holds another model than the one configured ({listed}); the model "
                   f"changed, the checkpoint is fine: restore these settings to resume it, or choose another "
                   f"run.dir{upcycle}")
        return refusal, None
    return None, (f"the model settings changed since {ckpt_dir.name} ({listed}): every tensor keeps its shape, so the "
                  "weights load as they are and the model computes with the new settings from here")


def _own_checkpoints(root: Path) -> Optional[ResumePlan]:
    """Resuming from the run's own checkpoints: ``latest``, then older ones; None if it has none."""
    found, latest = complete_checkpoints(root), latest_target(root)
    if latest is None and not found:
        return None
    candidates = resume_candidates(root)
    if latest is None or latest in candidates:
        return ResumePlan(candidates)
    said = f"{root / LATEST} names {latest.name}, but {latest} is missing"
    if not candidates:
        return ResumePlan([], refusal=f"checkpoint: {said}, and no complete checkpoint of this run comes before it: "
                                      "restore it, or start fresh with checkpoint.resume=none")
    return ResumePlan(candidates, notes=[f"{said}; resuming from the newest complete checkpoint before it, "
                                         f"{candidates[0].name}"])


def _named_checkpoint(path: Path) -> ResumePlan:
    """``checkpoint.resume=PATH``: a ``step_N`` directory, or a checkpoints directory (its latest)."""
    if (path / MANIFEST).is_file() or not path.is_dir():
        return ResumePlan([path], named=True)  # loading says what is wrong with it
    try:
        chosen = checkpoint_dir(path)
    except UserError as exc:
        return ResumePlan([], refusal=f"checkpoint.resume={path}: {exc}")
    return ResumePlan([chosen], named=True, notes=[f"checkpoint.resume={path} is a checkpoints directory: "
                                                   f"starting from its latest, {chosen.name}"])


def _plan(cfg: DictConfig, root: Path) -> ResumePlan:
    """``checkpoint.resume`` against the disk. ``auto``: the run's own latest (a fresh start if it
    has none). ``PATH``: where a run starts that has no checkpoints of its own yet; once it has
    some (a torchrun restart, a relaunch of the same command) it resumes from them, so that
    nothing it saved is recomputed. ``none``: a fresh start; checkpoints already in run.dir are
    set aside, so that they are neither resumed nor rolled back to."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        if not complete_checkpoints(root) and latest_target(root) is None:
            return ResumePlan([])
        moved = [p.name for p in complete_checkpoints(root)]
        aside = set_aside(root)
        return ResumePlan([], notes=[f"checkpoint.resume=none: set the checkpoints already in run.dir "
                                     f"({', '.join(moved) or 'none complete'}) aside in {aside}, where nothing "
                                     "resumes, rolls back to or prunes them; delete it to free its space"])
    plan = _own_checkpoints(root)
    if plan is not None and mode != "auto":
        plan.notes.insert(0, f"run.dir has checkpoints of its own: resuming from them, not from "
                             f"checkpoint.resume={mode} (where this run started)")
    elif plan is None:
        plan = ResumePlan([]) if mode == "auto" else _named_checkpoint(Path(mode))
    if plan.candidates and plan.refusal is None:
        plan.refusal, note = _model_change(cfg, plan.candidates[0])
        plan.notes += [note] if note else []
    return plan


def _resume_plan(state: TrainingState) -> ResumePlan:
    """Rank 0 makes the plan (and moves files for ``none``), every rank gets it, whatever its view of the disk."""
    plan = [_plan(state.cfg, checkpoint_root(state)) if state.grid.rank == 0 else None]
    if state.grid.world_size > 1:
        dist.broadcast_object_list(plan, src=0)
    received = plan[0]
    assert received is not None  # rank 0's plan, broadcast to every rank
    return received


def checkpoint_before(state: TrainingState, step: int) -> Optional[Path]:
    """The newest complete checkpoint of this run from before ``step`` (collective: rank 0 looks,
    every rank gets its answer), or None."""
    found = [next((p for p in complete_checkpoints(checkpoint_root(state)) if step_of(p) < step), None)]
    if state.grid.world_size > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def resume(state: TrainingState) -> Optional[Path]:
    """Apply ``checkpoint.resume`` (collective; see :func:`_plan`). Returns the checkpoint loaded,
    or None (fresh start).

    From the run's own checkpoints: the one ``latest`` names; if any rank finds a file of it
    corrupt or missing, say which and fall back to the next older complete checkpoint. A named
    one (``PATH`` in a run.dir without checkpoints): that one, or an error.
    """
    plan = _resume_plan(state)
    for note in plan.notes:
        log(state, note)
    if plan.refusal is not None:
        raise SharedError(plan.refusal)
    candidates, named = plan.candidates, plan.named
    for ckpt_dir in candidates:
        error: Optional[str] = None
        try:
            manifest = load_checkpoint(state, ckpt_dir)
        except CheckpointError as exc:
            error = str(exc)
        error = first_error(state.grid, error)
        if error is None:
            if manifest.has_optimizer:
                log(state, f"resumed from {ckpt_dir} at step {state.step}")
            else:
                log(state, f"{ckpt_dir} holds model weights only: starting at step 0 with a fresh optimizer")
            return ckpt_dir
        if named:
            raise CheckpointError(error)
        log(state, error)
        log(state, f"{ckpt_dir.name} is unusable; falling back to the previous checkpoint")
    if candidates:
        raise CheckpointError(f"{checkpoint_root(state)}: none of the {len(candidates)} checkpoints loads "
                              "(errors above); restore the damaged files, or start fresh with checkpoint.resume=none "
                              "(which sets these checkpoints aside)")
    return None
