"""Hugging Face checkpoint files, for any family: safetensors shards of bounded size plus
``model.safetensors.index.json`` and ``config.json`` (and, on export, the tokenizer's files:
megamoe.checkpoint.hf_tokenizer), read and written one tensor at a time — so converting the
40B M32 needs about one shard of memory, never the model. What the tensors are called and how
they are shaped is each family's adapter (megamoe.models.<family>.hf).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open

from megamoe.checkpoint.store import model_tensor_shapes, write_shards
from megamoe.errors import UserError
from megamoe.models import family_of

Tensors = Iterable[tuple[str, torch.Tensor]]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; --hf must be a Hugging Face model directory with config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def hf_shard_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of an HF model directory, in index order; each checked to exist."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [hf_dir / SINGLE_FILE]
    else:
        raise UserError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}; only safetensors checkpoints are read")
    for path in files:
        if not path.is_file():
            raise UserError(f"{path}: listed in {index} but missing; the download is incomplete")
    return files


def iter_hf_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an HF checkpoint, one at a time (each shard is memory-mapped, not loaded).

    A shard that safetensors cannot read (truncated by an interrupted download, or not a
    safetensors file at all) is one line naming it."""
    for path in hf_shard_files(hf_dir):
        try:
            with safe_open(str(path), framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)
        except SafetensorError as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc}); it is truncated or damaged: "
                            "download it again") from None


@dataclass
class WriteSummary:
    tensors: int = 0
    bytes: int = 0
    shards: int = 0


def write_hf_checkpoint(out_dir: Path, tensors: Tensors, config: dict[str, Any], max_shard_bytes: int,
                        files: Mapping[str, bytes] = {}) -> WriteSummary:
    """Write ``tensors`` as ``model-XXXXX-of-YYYYY.safetensors`` shards + index + config.json, and
    ``files`` (name → bytes: the tokenizer's, generation_config.json) beside them.

    Shards stream through the checkpoint store's writer: each is written as soon as the next
    tensor would take it past ``max_shard_bytes`` (a larger tensor gets a shard of its own), so
    memory holds one shard at most. Everything goes into ``out_dir.tmp`` first and is renamed at
    the end: an interrupted conversion never looks like a finished one. config.json gets
    ``torch_dtype`` when all tensors share one dtype.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    summary, dtypes = WriteSummary(), set()

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            summary.tensors += 1
            summary.bytes += tensor.numel() * tensor.element_size()
            dtypes.add(tensor.dtype)
            yield name, tensor

    try:
        shards = write_shards(tmp, "model", counted(), "model", max_shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.shards = len(shards)
    weight_map = {}
    for number, (file, entry) in enumerate(shards.items(), start=1):
        final = f"model-{number:05d}-of-{summary.shards:05d}.safetensors"
        os.replace(tmp / file, tmp / final)
        weight_map.update(dict.fromkeys(entry.tensors, final))
    index = {"metadata": {"total_size": summary.bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if len(dtypes) == 1:
        config = {**config, "torch_dtype": str(dtypes.pop()).removeprefix("torch.")}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    os.replace(tmp, out_dir)
    return summary


def parse_size(text: str) -> int:
    """'5GB' → 5·10⁹, '512MiB' → 512·2²⁰, '1000' → 1000 bytes (the HF ``max_shard_size`` spelling)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size: '{text}' is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match[1]), (match[2] or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return max(1, math.floor(number * base**power))


def hf_tensor_shapes(cfg: DictConfig) -> dict[str, torch.Size]:
    """Every tensor an HF checkpoint of ``cfg`` must hold, with its shape (mapped on the meta device).

    A tied model's ``lm_head.weight`` is left out: it may be there or not, and is ignored.
    """
    meta = ((name, torch.empty(shape, device="meta")) for name, shape in model_tensor_shapes(cfg).items())
    adapter, tied = family_of(cfg).hf, cfg.model.tie_embeddings
    return {name: tensor.shape for name, tensor in adapter.to_hf(meta, cfg) if not adapter.ignored(name, tied)}


