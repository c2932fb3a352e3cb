"""A running job ↔ a checkpoint: who writes what, who reads what, resuming with fallback.

Every tensor a rank holds has a *placement*: its global name(s) in the checkpoint and whether
this rank writes it. Dense tensors are written by data-parallel rank 0 of their pipeline stage,
expert banks by expert-data-parallel rank 0 of each ep rank (one name per global expert), and
the last stage's copy of a tied embedding is never written (it equals ``embed.weight``). On
load every rank reads exactly the names its placements list, from whichever files hold them —
so a checkpoint written by one (dp, pp, ep) loads into any other, optimizer state included.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from megamoe.checkpoint.store import (
    CONFIG,
    CheckpointError,
    FileEntry,
    Manifest,
    commit,
    prune,
    read_manifest,
    read_shard,
    read_verified,
    resume_candidates,
    set_latest,
    write_bytes,
    write_shards,
)
from megamoe.checkpoint.names import expert_bank_names, expert_tensor_name, model_tensor_shapes
from megamoe.cli import SharedError, write_error
from megamoe.data.loader import stream_change
from megamoe.nn.init import init_key_seed
from megamoe.parallel.expert import expert_range
from megamoe.parallel.mesh import ProcessGrid, first_error



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
    models: list[nn.Module]
    optimizer: torch.optim.Optimizer
    data: Stateful
    data_stream: dict[str, Any]  # what fixes the sample order (megamoe.data.loader.data_stream)
    step: int = 0


@dataclass(frozen=True)
class Placement:
    """Where one local parameter or buffer lives in the checkpoint's global namespace.

    ``names`` holds one global name, or for an expert bank one per local expert (``tensor[i]``
    is expert ``names[i]``). ``owned``: this rank is the one that writes it.
    """

    tensor: Tensor
    names: tuple[str, ...]
    owned: bool
    bank: bool

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
                names = tuple(expert_tensor_name(name, e) for e in experts)
                result.append(Placement(tensor, names, owned=grid.edp_rank == 0, bank=True))
            elif name in copies:  # a last stage's copy of the tied embedding: stored once, as the original
                result.append(Placement(tensor, (copies[name],), owned=False, bank=False))
            else:
                result.append(Placement(tensor, (name,), owned=grid.dp_rank == 0, bank=False))
    return result


def checkpoint_root(state: TrainingState) -> Path:
    return Path(state.cfg.run.dir) / "checkpoints"


def _log(state: TrainingState, message: str) -> None:
    if state.grid.rank == 0:
        print(f"checkpoint: {message}", flush=True)


def _gather_on_rank0(state: TrainingState, obj: Any) -> Optional[list[Any]]:
    """Every rank's ``obj`` as a list on rank 0; None on the other ranks."""
    grid = state.grid
    if grid.world_size == 1:
        return [obj]
    gathered: Optional[list[Any]] = [None] * grid.world_size if grid.rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


# ---------------------------------------------------------------------------------------------
# Save


def _model_pieces(places: list[Placement]) -> Iterator[tuple[str, Tensor]]:
    for place in places:
        if place.owned:
            yield from place.pieces(place.tensor.detach())


def _optimizer_pieces(optimizer: torch.optim.Optimizer, places: list[Placement]) -> Iterator[tuple[str, Tensor]]:
    """AdamW's exp_avg / exp_avg_sq / step (whatever state it keeps) as ``{key}/{global name}``."""
    for place in places:
        state = optimizer.state.get(place.tensor, {}) if place.owned else {}
        for key, value in state.items():
            if torch.is_tensor(value):
                yield from ((f"{key}/{name}", piece) for name, piece in place.pieces(value.detach()))


def _rng_bytes() -> bytes:
    """This rank's RNG states (torch CPU and CUDA, Python, NumPy), as a weights-only torch file."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
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
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _layout(state: TrainingState) -> dict[str, int]:
    g = state.grid
    return {"world_size": g.world_size, "pp": g.pp, "dp": g.dp, "ep": g.ep,
            "virtual_stages": state.cfg.parallel.virtual_stages}


def _first_nonfinite(places: list[Placement], optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Name of this rank's first tensor (weight, buffer or optimizer state) holding a NaN or Inf."""
    for place in places:
        state = optimizer.state.get(place.tensor, {})
        for key, value in (("", place.tensor), *((f"{k}/", v) for k, v in state.items() if torch.is_tensor(v))):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return next(f"{key}{name}" for name, piece in place.pieces(value) if not bool(torch.isfinite(piece).all()))
    return None


def _total_bytes(state: TrainingState, pieces: list[tuple[str, Tensor]]) -> int:
    """Bytes of the whole checkpoint: every rank's share summed (collective)."""
    total = torch.tensor([float(sum(t.numel() * t.element_size() for _, t in pieces))], dtype=torch.float64)
    if state.grid.world_size > 1:
        dist.all_reduce(total)
    return int(total.item())


def _failure(action: Callable[[], Any]) -> Optional[str]:
    """Run one rank's part of a save; a failed write comes back as its (errno, reason, file) in JSON."""
    try:
        action()
    except OSError as exc:
        return json.dumps([exc.errno, exc.strerror, exc.filename])
    return None


def save_checkpoint(state: TrainingState) -> Optional[Path]:
    """Save the job's state at its current step (collective: every rank calls it).

    Each rank streams what it owns into ``step_N.tmp/`` (fsynced); rank 0 collects the file
    entries, writes config and manifest, renames the directory, moves ``latest`` and prunes
    to ``checkpoint.keep``. When this returns, the checkpoint is there.

    A state holding NaN or Inf is not saved (returns None): it could only be resumed into the
    same failure. A write that fails on any rank (disk full, read-only directory) removes the
    partial save and raises SharedError naming the file: earlier checkpoints stay as they were.
    """
    grid, root, step = state.grid, checkpoint_root(state), state.step
    places, stem = placements(state), f"r{grid.rank:05d}"
    bad = first_error(grid, _first_nonfinite(places, state.optimizer))
    if bad is not None:
        _log(state, f"not saving step {step}: {bad} holds NaN or Inf values (a diverged state cannot be resumed)")
        return None
    tmp, final = root / f"step_{step}.tmp", root / f"step_{step}"
    model, optim = list(_model_pieces(places)), list(_optimizer_pieces(state.optimizer, places))
    needed = _total_bytes(state, model + optim)
    files: dict[str, FileEntry] = {}

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write() -> None:
        files.update(write_shards(tmp, f"model-{stem}", iter(model), "model"))
        files.update(write_shards(tmp, f"optim-{stem}", iter(optim), "optim"))
        files[f"rng-{stem}.pt"] = write_bytes(tmp / f"rng-{stem}.pt", _rng_bytes(), "rng")

    error = first_error(grid, _failure(prepare) if grid.rank == 0 else None)
    if error is None:
        error = first_error(grid, _failure(write))
    if error is None:
        every_rank = _gather_on_rank0(state, files)
        error = first_error(grid, _failure(lambda: _commit(state, tmp, final, every_rank)) if every_rank else None)
    if error is not None:
        if grid.rank == 0:  # only rank 0 reports: its free space counts the partial save as removed
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_error(OSError(*json.loads(error)), "free space or choose another run.dir", needed)
        raise SharedError(f"checkpoint: cannot save step {step}: {reason}; the run stopped, earlier checkpoints are intact")
    _log(state, f"saved step {step} to {final}")
    return final


def _commit(state: TrainingState, tmp: Path, final: Path, every_rank: list[dict[str, FileEntry]]) -> None:
    """Rank 0: config and manifest (written last), then the rename, ``latest``, and pruning."""
    root = final.parent
    all_files = {name: entry for rank_files in every_rank for name, entry in rank_files.items()}
    all_files[CONFIG] = write_bytes(tmp / CONFIG, OmegaConf.to_yaml(state.cfg).encode(), "config")
    counters = {
        "step": state.step,  # also the position in the lr schedule
        "loader": state.data.state_dict(),  # consumed samples
        "global_batch": state.cfg.train.global_batch,
        "data_stream": state.data_stream,  # a resume that changes it would read other samples
        "optimizer_group_steps": [group.get("step") for group in state.optimizer.param_groups],  # apex keeps it here
    }
    Manifest(state.step, True, all_files, counters, _layout(state)).write(tmp)
    commit(tmp, final)
    set_latest(root, final)
    prune(root, final, state.cfg.checkpoint.keep)


# ---------------------------------------------------------------------------------------------
# Load


def _check_names(manifest: Manifest, state: TrainingState, ckpt_dir: Path) -> None:
    """The checkpoint holds exactly the configured model's tensors (shapes are checked on copy)."""
    stored = {t for name in manifest.files_of_kind("model") for t in manifest.files[name].tensors}
    expected = set(model_tensor_shapes(state.cfg))
    for what, names in (("is missing", expected - stored), ("is not a parameter of the configured model", stored - expected)):
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


def _check_data_stream(state: TrainingState, ckpt_dir: Path, manifest: Manifest) -> None:
    """Resume only into the same sample stream, unless checkpoint.allow_data_change says otherwise.

    The global batch may change: the next step starts at the same consumed sample (Megatron's
    rule), so no sample is repeated or skipped.
    """
    saved, cfg = manifest.state, state.cfg
    consumed = saved["loader"]["consumed_samples"]
    change = stream_change(saved.get("data_stream", state.data_stream), state.data_stream)
    if change is not None and not cfg.checkpoint.allow_data_change:
        raise SharedError(f"{ckpt_dir}: the training data stream changed since this checkpoint ({change}), so the run "
                          f"would read other samples than it was going to; restore the setting, or set "
                          f"checkpoint.allow_data_change=true to continue at sample {consumed} of the new stream")
    if change is not None:
        _log(state, f"the data stream changed ({change}); continuing at sample {consumed} of the new stream")
    before = saved.get("global_batch", cfg.train.global_batch)
    if before != cfg.train.global_batch:
        _log(state, f"train.global_batch changed from {before} to {cfg.train.global_batch}: "
                      f"continuing at sample {consumed} of the same stream")


def _restore_rng_or_reseed(state: TrainingState, ckpt_dir: Path, manifest: Manifest) -> None:
    """Same layout: each rank gets its own RNG states back. Another layout has other ranks, so
    their streams restart from (seed, rank, step) — only noisy gating draws from them."""
    grid = state.grid
    if manifest.layout == _layout(state):
        name = f"rng-r{grid.rank:05d}.pt"
        _restore_rng(read_verified(ckpt_dir / name, manifest.files[name]).numpy().tobytes())
    else:
        torch.manual_seed(init_key_seed(state.cfg.seed, "resume", grid.rank, state.step))
        _log(state, f"layout changed from {manifest.layout} to {_layout(state)}: weights, optimizer and data "
                      "position carry over; RNG streams restart from (seed, rank, step)")


def load_checkpoint(state: TrainingState, ckpt_dir: Path) -> Manifest:
    """Load ``ckpt_dir`` into this rank (in place). Raises CheckpointError naming a bad file.

    A model-only checkpoint (``write_model_checkpoint``) sets the weights and starts at step 0
    with a fresh optimizer.
    """
    manifest = read_manifest(ckpt_dir)
    _check_names(manifest, state, ckpt_dir)
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


def _candidates(state: TrainingState) -> tuple[list[Path], bool]:
    """What checkpoint.resume asks for: (directories to try in order, whether one was named)."""
    mode = state.cfg.checkpoint.resume
    if mode == "none":
        return [], False
    if mode != "auto":
        return [Path(mode)], True
    found = [resume_candidates(checkpoint_root(state)) if state.grid.rank == 0 else None]
    if state.grid.world_size > 1:  # every rank tries the same list, whatever its view of the disk
        dist.broadcast_object_list(found, src=0)
    return found[0], False  # type: ignore[return-value]


def resume(state: TrainingState) -> Optional[Path]:
    """Apply ``checkpoint.resume`` (collective). Returns the checkpoint loaded, or None (fresh start).

    ``auto``: the checkpoint ``latest`` names; if any rank finds a file of it corrupt or missing,
    say which and fall back to the next older complete checkpoint. ``PATH``: that one, or an
    error. ``none``: start fresh.
    """
    candidates, named = _candidates(state)
    for ckpt_dir in candidates:
        error: Optional[str] = None
        try:
            manifest = load_checkpoint(state, ckpt_dir)
        except CheckpointError as exc:
            error = str(exc)
        error = first_error(state.grid, error)
        if error is None:
            if manifest.has_optimizer:
                _log(state, f"resumed from {ckpt_dir} at step {state.step}")
            else:
                _log(state, f"{ckpt_dir} holds model weights only: starting at step 0 with a fresh optimizer")
            return ckpt_dir
        if named:
            raise CheckpointError(error)
        _log(state, error)
        _log(state, f"{ckpt_dir.name} is unusable; falling back to the previous checkpoint")
    if candidates:
        raise CheckpointError(f"{checkpoint_root(state)}: none of the {len(candidates)} checkpoints loads "
                              "(errors above); fix or remove them, or start fresh with checkpoint.resume=none")
    return None
