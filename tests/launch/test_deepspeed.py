"""launch/deepspeed/: the example hostfile as DeepSpeed's launcher reads it, and the README's command."""

from pathlib import Path

import pytest

from megamoe.config import compose
from megamoe.models import validate_config

ROOT = Path(__file__).resolve().parents[2]
HOSTFILE = ROOT / "launch" / "deepspeed" / "hostfile.example"
README = ROOT / "launch" / "deepspeed" / "README.md"


def test_deepspeed_parses_the_example_hostfile() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import fetch_hostfile

    resources = fetch_hostfile(str(HOSTFILE))
    assert resources == {f"node00{i}": 8 for i in range(1, 5)}


def test_the_example_world_is_a_valid_m32_layout() -> None:
    """32 slots give M32's pp 8 × dp 4, and its global batch splits into whole micro-batches."""
    slots = [int(line.split("slots=")[1]) for line in HOSTFILE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    validate_config(compose(["+exp=m32_2000b"]), world_size=sum(slots))


def test_readme_launch_line_names_this_hostfile() -> None:
    text = README.read_text()
    assert "deepspeed --hostfile launch/deepspeed/hostfile.example launch/pretrain.py +exp=m32_2000b" in text
    for exp in ("m32_2000b", "m32_8gpu", "tiny"):
        assert f"+exp={exp}" in text and (ROOT / "configs" / "exp" / f"{exp}.yaml").is_file()
