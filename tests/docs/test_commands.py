"""Every shell command the docs show is exercised: run, parsed by its own CLI, or validated.

For each line of every ```bash block in README.md, docs/*.md, docker/README.md and
launch/deepspeed/README.md:

- `launch/pretrain.py` commands: the config is composed and validated at the world size their
  launcher implies (torchrun --nproc_per_node, deepspeed --num_gpus or hostfile slots, sbatch
  --nodes × 8 GPUs); the tiny ones also train in other tests;
- `launch/model_stats.py` commands run; `launch/dry_run.py` ones are parsed and their configs
  validated at their world size;
- `launch/slurm/preprocess.sbatch` arrays: each task's and the merge's preprocess_data arguments
  are parsed as the script builds them;
- data_tools, convert_checkpoint, generate, evaluate and report commands are parsed by the tool's own parser
  (their behaviour is tested in tests/data_tools and tests/launch);
- `make demo` / `make test` are what the demo and CI run; `docker build` lines name the
  Dockerfile that tests/docker lints; `pip install -e ".[extra]"` names extras pyproject.toml has.

A command none of these covers fails the test, so a new command in the docs comes with a check.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from megamoe.config import compose
from megamoe.models import validate_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md",
        ROOT / "launch" / "deepspeed" / "README.md"]
GPUS_PER_NODE = 8  # launch/slurm/pretrain.sbatch


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for each command in a bash block; shell variables (set earlier on the page) and
    for-loops expanded."""
    commands = []
    for doc in DOCS:
        variables: dict[str, str] = {}  # a page's blocks are one shell session: a variable set above holds below
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip().removeprefix("$ ")
                loop = re.match(r"for (\w+) in (\S+)", line)
                assignment = re.match(r"(\w+)='(.*)'$", line)
                if loop:
                    variables[loop.group(1)] = loop.group(2)
                elif assignment:
                    variables[assignment.group(1)] = assignment.group(2)
                elif line and not line.startswith(("#", "error:", "done")):
                    for name, value in variables.items():
                        line = line.replace(f"${name}", value)
                    commands.append((f"{doc.relative_to(ROOT)}: {line[:80]}", shlex.split(line, comments=True)))
    return commands


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def world_size(argv: list[str]) -> int | None:
    """Processes the launcher starts; None when the command itself decides (a hostfile's slots)."""
    if argv[0] == "sbatch":
        return int(_flag(argv, "--nodes")) * GPUS_PER_NODE
    if argv[0] == "deepspeed" and _flag(argv, "--hostfile"):
        hostfile = (ROOT / _flag(argv, "--hostfile")).read_text()
        return sum(int(n) for n in re.findall(r"slots=(\d+)", hostfile))
    count = _flag(argv, "--nproc_per_node") or _flag(argv, "--num_gpus")
    return int(count or 1) * int(_flag(argv, "--nnodes") or 1)


def check_pretrain(argv: list[str]) -> None:
    script = next(i for i, a in enumerate(argv) if a.endswith(("pretrain.py", "pretrain.sbatch")))
    overrides = argv[script + 1:]
    cfg = compose(overrides)
    if "parallel.ep=4" in overrides and world_size(argv) == 2:  # the documented error example
        with pytest.raises(Exception, match="parallel.ep: 4 does not divide"):
            validate_config(cfg, world_size(argv))
        return
    validate_config(cfg, world_size(argv))


def check_model_stats(argv: list[str]) -> None:
    script = next(i for i, a in enumerate(argv) if a.endswith("model_stats.py"))
    result = subprocess.run([sys.executable, "launch/model_stats.py", *argv[script + 1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def check_dry_run(argv: list[str]) -> None:
    """Parsed by its own parser, its config validated at its world size (the dry runs themselves
    take minutes: tests/dryrun, docs/benchmarks.md)."""
    from launch import dry_run

    args, overrides = dry_run.parse_args(argv[argv.index("launch/dry_run.py") + 1:])
    dry_run.hardware(args.gpu, args.gpu_memory)
    validate_config(compose(overrides), args.world_size)


def check_parsed_by(module: str, function: str) -> Callable[[list[str]], None]:
    def check(argv: list[str]) -> None:
        start = next(i for i, a in enumerate(argv) if a == module or a.endswith(module.replace(".", "/") + ".py"))
        tool = __import__(module, fromlist=[function])
        parse = getattr(tool, function)
        (parse().parse_args if function == "parser" else parse)(argv[start + 1:])
    return check


def array_indices(spec: str) -> list[int]:
    """SLURM's --array syntax ("0-63", "2,5", "0-7%2") as task indices."""
    indices: list[int] = []
    for part in spec.split("%")[0].split(","):
        first, _, last = part.partition("-")
        indices += range(int(first), int(last or first) + 1)
    return indices


def check_preprocess_sbatch(argv: list[str]) -> None:
    """As launch/slurm/preprocess.sbatch runs it: an array 0..N-1 implies --num-shards N; each task
    adds --shard-index, and the merge job --merge-shards."""
    from data_tools.preprocess_data import parse_args

    script = next(i for i, a in enumerate(argv) if a.endswith("preprocess.sbatch"))
    assert (ROOT / argv[script]).is_file(), argv[script]
    spec = _flag(argv[:script], "--array")
    assert spec, "preprocess.sbatch runs as an array: sbatch --array=..."
    indices = array_indices(spec)
    implied = ["--num-shards", str(len(indices))] if indices == list(range(len(indices))) else []
    for index in indices[0], indices[-1]:
        parse_args([*implied, *argv[script + 1:], "--shard-index", str(index)])
    parse_args([*implied, *argv[script + 1:], "--merge-shards"])


def check_extras(argv: list[str]) -> None:
    """``pip install -e ".[a,b]"``: the extras are pyproject.toml's."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.M))
    wanted = re.fullmatch(r"\.\[(.+)\]", argv[-1])
    assert wanted and set(wanted.group(1).split(",")) <= extras, (argv, extras)


def check_known(argv: list[str]) -> None:
    assert argv[:2] in (["make", "demo"], ["make", "test"]) or (argv[:2] == ["docker", "build"]
                                                                   and (ROOT / _flag(argv, "-f")).exists())


HANDLERS: list[tuple[Callable[[list[str]], bool], Callable[[list[str]], None]]] = [
    (lambda a: any(x.endswith(("launch/pretrain.py", "pretrain.sbatch")) for x in a), check_pretrain),
    (lambda a: any(x.endswith("launch/model_stats.py") for x in a), check_model_stats),
    (lambda a: any(x.endswith("launch/slurm/preprocess.sbatch") for x in a), check_preprocess_sbatch),
    (lambda a: "launch/convert_checkpoint.py" in a, check_parsed_by("launch.convert_checkpoint", "parser")),
    (lambda a: "launch/evaluate.py" in a, check_parsed_by("launch.evaluate", "parser")),
    (lambda a: "launch/generate.py" in a, check_parsed_by("launch.generate", "parser")),
    (lambda a: "launch/plan.py" in a, check_parsed_by("launch.plan", "parse_args")),
    (lambda a: "launch/dry_run.py" in a, check_dry_run),
    (lambda a: "launch/report.py" in a, check_parsed_by("launch.report", "main")),
    *[(lambda a, m=m: f"data_tools.{m}" in a, check_parsed_by(f"data_tools.{m}", "parse_args"))
      for m in ("preprocess_data", "merge_datasets", "train_tokenizer", "make_demo_corpus", "inspect_data")],
    (lambda a: a[0] in ("make", "docker") and "run" not in a[:2], check_known),
    (lambda a: a[:3] == ["pip", "install", "-e"], check_extras),
]


@pytest.mark.parametrize(("where", "argv"), documented_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_documented_command_is_exercised(where: str, argv: list[str]) -> None:
    if argv[:2] == ["docker", "run"]:
        argv = argv[argv.index("megamoe", 2) + 1:]  # the command inside the image
    handler = next((check for matches, check in HANDLERS if matches(argv)), None)
    assert handler is not None, f"{where}: no check covers this documented command; add one here"
    handler(argv)
