"""Convert checkpoints: megamoe <-> Hugging Face (each model family's own layout: Yuan2-M32,
Qwen2-MoE), and dense -> MoE upcycling.

  python launch/convert_checkpoint.py to-hf --checkpoint DIR --output HF_DIR [--max-shard-size 5GB] [--dtype bf16]
      [--tokenizer-model PATH]
  python launch/convert_checkpoint.py from-hf --hf HF_DIR --output DIR [+exp=NAME key=value ...]
  python launch/convert_checkpoint.py upcycle --dense DIR --output DIR --num-experts N [--granularity G] [--top-k K]
      [--shared-expert] [--layer-freq N | --layer-freq "([0]*3+[1]*21)"]

--checkpoint / --dense take a checkpoint (step_N/) or a checkpoints directory (its latest).
to-hf writes the weights, config.json, the run's tokenizer (tokenizer.json or tokenizer.model,
tokenizer_config.json, special_tokens_map.json) and generation_config.json, so the directory
loads with AutoModelForCausalLM and AutoTokenizer. from-hf picks the family from config.json's
model_type and takes the architecture from it (and the training settings it records), and
everything else (training, data, parallel layout) from the usual overrides; the result is a
model-only checkpoint that a run starts from with checkpoint.resume=DIR. Every conversion
streams tensor by tensor, so memory stays around one shard whatever the model size. Mistakes
end with one error: line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from megamoe.checkpoint import hf_files, hf_tokenizer
from megamoe.checkpoint.store import (
    Manifest,
    checked_tensors,
    checkpoint_dir,
    iter_model_tensors,
    model_tensor_shapes,
    read_config,
    read_manifest,
    write_model_checkpoint,
)
from megamoe.checkpoint.upcycle import upcycle, upcycled_config
from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.config.layers import moe_layer_flags
from megamoe.data.tokenizer import Tokenizer, build_tokenizer
from megamoe.errors import ConfigError, UserError, format_bytes, free_bytes
from megamoe.models import FAMILIES, ModelFamily, family_for_hf, family_of, validate_config
from megamoe.models.hf_mapping import TRAINING_KEYS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fresh_output(path: Path) -> Path:
    if path.exists():
        raise UserError(f"{path}: already exists; remove it or choose another --output")
    return path


def progress(total: int, what: str) -> tqdm:
    """A bar to use as a context manager: closed (its line ended) before any error is printed."""
    return tqdm(total=total, desc=what, unit="tensor", file=sys.stderr)


def ticking(tensors: Iterable[tuple[str, torch.Tensor]], bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    for item in tensors:
        yield item
        bar.update()


def report(what: str, tensors: int, nbytes: int, shards: int, out: Path, start: float) -> None:
    seconds = time.perf_counter() - start
    print(f"{what}: {tensors} tensors, {nbytes / 1e9:.3f} GB in {shards} shard(s) -> {out} "
          f"({seconds:.1f} s, {nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)")


def model_bytes(manifest: Manifest) -> int:
    return sum(entry.bytes for entry in manifest.files.values() if entry.kind == "model")


# --------------------------------------------------------------------------------------------


def run_tokenizer(cfg: DictConfig, model_file: Path | None) -> Tokenizer:
    """The tokenizer the run trained with (``model_file`` where its file has moved since)."""
    t = cfg.data.tokenizer
    try:
        return build_tokenizer(t.type, str(model_file) if model_file else t.model, t.eod_token)
    except UserError as exc:
        raise UserError(f"{exc}; to-hf exports the run's tokenizer (data.tokenizer): pass --tokenizer-model PATH "
                        "where its file is now") from None


def to_hf_command(args: argparse.Namespace) -> None:
    source, out = checkpoint_dir(args.checkpoint), fresh_output(args.output)
    cfg = read_config(source)
    adapter = family_of(cfg).hf
    adapter.check_exportable(cfg)  # what the format cannot express, before any work
    tokenizer = run_tokenizer(cfg, args.tokenizer_model)
    config = adapter.hf_config(cfg, hf_tokenizer.token_ids(tokenizer))
    files = {**hf_tokenizer.tokenizer_files(tokenizer, cfg.model.max_position_embeddings),
             hf_tokenizer.GENERATION_CONFIG: hf_tokenizer.generation_config(tokenizer, cfg.model.vocab_size)}
    shapes = model_tensor_shapes(cfg)
    start = time.perf_counter()
    with progress(len(shapes), "to-hf") as bar:
        tensors = adapter.to_hf(ticking(checked_tensors(iter_model_tensors(source), shapes, source), bar), cfg)
        if args.dtype:
            tensors = ((name, tensor.to(DTYPES[args.dtype])) for name, tensor in tensors)
        summary = hf_files.write_hf_checkpoint(out, tensors, config, args.max_shard_size, files)
    report("to-hf", summary.tensors, summary.bytes, summary.shards, out, start)
    print(f"tokenizer: {cfg.data.tokenizer.type} as {', '.join(files)}")


def hf_family(config: dict, source: Path) -> ModelFamily:
    """The family whose adapter reads this config.json (by its ``model_type``)."""
    family = family_for_hf(config.get("model_type"))
    if family is None:
        raise UserError(f"{source}: model_type {config.get('model_type')!r} is not a layout megamoe reads "
                        f"(its families: {', '.join(FAMILIES)})")
    return family


def hf_training_config(hf_dir: Path, overrides: list[str]) -> DictConfig:
    """The run config (from ``overrides``) with the family and architecture of the HF checkpoint
    in ``hf_dir``.

    An explicit override of an architecture key that disagrees with config.json is an error
    rather than silently lost; one of the training settings config.json records
    (hf_mapping.TRAINING_KEYS) wins over it. Without a ``train.seq_len`` override, a model of
    fewer positions than the default sequence length trains at its own ``max_position_embeddings``.
    """
    source = hf_dir / hf_files.CONFIG_FILE
    cfg = compose(overrides)
    config = hf_files.read_hf_config(hf_dir)
    family = hf_family(config, source)
    architecture = family.hf.config_from_hf(config, str(source))
    architecture["model"]["family"] = family.name
    explicit = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    for section, values in architecture.items():
        for key, value in list(values.items()):
            dotted = f"{section}.{key}"
            if dotted in explicit and dotted in TRAINING_KEYS:
                del values[key]  # the run's own setting
            elif dotted in explicit and OmegaConf.select(cfg, dotted) != value:
                raise UserError(f"{dotted}={OmegaConf.select(cfg, dotted)} contradicts {source} ({value}); "
                                "the architecture comes from the checkpoint: drop the override")
    positions = architecture["model"]["max_position_embeddings"]
    if isinstance(positions, int) and cfg.train.seq_len > positions and "train.seq_len" not in explicit:
        print(f"note: train.seq_len={positions}, the model's max_position_embeddings (the default "
              f"{cfg.train.seq_len} does not fit); set train.seq_len to choose another", file=sys.stderr)
        architecture["train"] = {"seq_len": positions}
    try:
        merged = OmegaConf.merge(cfg, architecture)
    except OmegaConfBaseException as exc:
        raise UserError(f"{source}: {exc.full_key}: {str(exc).splitlines()[0]}") from None
    try:
        validate_config(merged)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (with the architecture of {source}; set the run's other keys as overrides)") from None
    family.hf.check_exportable(merged)  # what came in must map back (e.g. the rotary split survived the float division)
    return merged  # type: ignore[return-value]


def from_hf_command(args: argparse.Namespace) -> None:
    out = fresh_output(args.output)
    cfg = hf_training_config(args.hf, args.overrides)
    adapter, tied = family_of(cfg).hf, cfg.model.tie_embeddings
    shapes = hf_files.hf_tensor_shapes(cfg)
    source = ((name, t) for name, t in hf_files.iter_hf_tensors(args.hf) if not adapter.ignored(name, tied))
    start = time.perf_counter()
    with progress(len(shapes), "from-hf") as bar:
        tensors = adapter.from_hf(ticking(checked_tensors(source, shapes, args.hf), bar), cfg)
        manifest = write_model_checkpoint(out, tensors, cfg)
    report("from-hf", len(model_tensor_shapes(cfg)), model_bytes(manifest), len(manifest.files_of_kind("model")), out,
           start)
    print(f"start training from it with checkpoint.resume={out}")


def upcycled_bytes(source: Path, dense_cfg: DictConfig, cfg: DictConfig) -> int:
    """About how large the upcycled checkpoint is: its elements at the dense checkpoint's bytes per element."""
    elements = lambda c: sum(shape.numel() for shape in model_tensor_shapes(c).values())  # noqa: E731
    return model_bytes(read_manifest(source)) * elements(cfg) // elements(dense_cfg)


def check_room(out: Path, nbytes: int, fix: str) -> None:
    """Refuse a write that cannot fit the free space of ``out``'s file system (before writing any of it)."""
    free = free_bytes(out)
    if nbytes > free:
        raise UserError(f"{out}: the output needs about {format_bytes(nbytes)}, its file system has "
                        f"{format_bytes(free)} free; {fix}")


def layer_freq_arg(text: str) -> int | str:
    """--layer-freq: an int N, or the list as text (moe.layer_freq reads Megatron's list expressions)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def upcycle_command(args: argparse.Namespace) -> None:
    source, out = checkpoint_dir(args.dense), fresh_output(args.output)
    dense_cfg = read_config(source)
    cfg = upcycled_config(dense_cfg, args.num_experts, args.granularity, args.top_k, args.shared_expert,
                          args.layer_freq)
    size = upcycled_bytes(source, dense_cfg, cfg)
    check_room(out, size, "free space, choose another --output, or fewer --num-experts")
    print(f"upcycle: {cfg.moe.num_experts} experts per layer, about {format_bytes(size)} -> {out}", flush=True)
    seed = dense_cfg.seed if args.seed is None else args.seed
    shapes = model_tensor_shapes(dense_cfg)
    start = time.perf_counter()
    with progress(len(shapes), "upcycle") as bar:
        dense = ticking(checked_tensors(iter_model_tensors(source), shapes, source), bar)
        manifest = write_model_checkpoint(out, upcycle(dense, cfg, args.granularity, seed), cfg)
    report("upcycle", len(model_tensor_shapes(cfg)), model_bytes(manifest), len(manifest.files_of_kind("model")), out,
           start)
    shared = f" + a gated shared expert of width {cfg.moe.shared_expert_ffn_hidden_size}" if args.shared_expert else ""
    moe_layers = sum(moe_layer_flags(cfg.model, cfg.moe))
    print(f"{cfg.moe.num_experts} experts of width {cfg.moe.ffn_hidden_size}, top-{cfg.moe.top_k} "
          f"({args.num_experts} copies x granularity {args.granularity}){shared}, in {moe_layers} of "
          f"{cfg.model.num_layers} layers, router seed {seed}")


# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    to = sub.add_parser("to-hf", help="megamoe checkpoint -> Hugging Face directory (its family's layout)")
    to.add_argument("--checkpoint", type=Path, required=True, help="step_N/ or a checkpoints directory")
    to.add_argument("--output", type=Path, required=True, help="new Hugging Face model directory")
    to.add_argument("--max-shard-size", type=hf_files.parse_size, default="5GB",
                    help="largest safetensors shard (default 5GB)")
    to.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    to.add_argument("--tokenizer-model", type=Path,
                    help="the run's tokenizer file, if it has moved since training (default: data.tokenizer.model)")
    to.set_defaults(run=to_hf_command)

    back = sub.add_parser("from-hf", help="Hugging Face directory (Yuan2-M32, Qwen2-MoE) -> megamoe checkpoint")
    back.add_argument("--hf", type=Path, required=True, help="Hugging Face model directory (safetensors)")
    back.add_argument("--output", type=Path, required=True, help="new checkpoint directory")
    back.add_argument("overrides", nargs="*", help="training config overrides, e.g. +exp=m32_2000b train.lr=2e-5")
    back.set_defaults(run=from_hf_command)

    up = sub.add_parser("upcycle", help="dense megamoe checkpoint -> MoE checkpoint (experts copy the FFN)")
    up.add_argument("--dense", type=Path, required=True, help="checkpoint of a model.ffn_type=dense run")
    up.add_argument("--output", type=Path, required=True, help="new checkpoint directory")
    up.add_argument("--num-experts", type=int, required=True, help="copies N of the dense FFN")
    up.add_argument("--granularity", type=int, default=1, help="slices G per copy: N*G experts of width F/G")
    up.add_argument("--top-k", type=int, default=2, help="copies' worth K each token uses: moe.top_k = K*G")
    up.add_argument("--shared-expert", action="store_true",
                    help="add a shared expert (the dense FFN) behind a sigmoid gate, as Qwen1.5-MoE")
    up.add_argument("--layer-freq", type=layer_freq_arg, default=1,
                    help="which layers become MoE, as moe.layer_freq: N for layers 0, N, 2N, ... (default 1: all), "
                         "or one 0/1 per layer, e.g. '[0,1,1,1]' or '([0]*3+[1]*21)'; the others keep the dense FFN")
    up.add_argument("--seed", type=int, help="router seed (default: the dense run's seed)")
    up.set_defaults(run=upcycle_command)
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.run(args)


if __name__ == "__main__":
    main()
