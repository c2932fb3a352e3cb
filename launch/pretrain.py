"""Train a Yuan-style MoE: `torchrun --nproc_per_node=N launch/pretrain.py +exp=NAME [key=value ...]`.

Also runs under the DeepSpeed launcher (`deepspeed --num_gpus N launch/pretrain.py ...`; its
`--local_rank` argument is accepted and ignored, the rank comes from the environment), under
SLURM's `srun` (SLURM_PROCID / SLURM_NTASKS), and as a single plain `python` process.

The config is composed (Hydra) and validated against the world size *before* any process group
starts, so a typo or an impossible layout ends with one line on rank 0 and exit code 2, never a
hang. Errors that every rank meets at once (a full disk during a save, a run directory held by
another run, a diverged run) are agreed between the ranks and likewise reported by rank 0 alone.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.errors import ConfigError, SharedError
from megamoe.models import validate_config
from megamoe.parallel.mesh import read_launch_env
from megamoe.parallel.stall import CollectiveStall, reported


def hydra_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides, without the `--local_rank=N` that the DeepSpeed launcher appends."""
    return [arg for arg in argv if not arg.startswith("--local_rank")]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    env = read_launch_env()
    try:
        cfg = compose(hydra_overrides(sys.argv[1:] if argv is None else argv))
        validate_config(cfg, world_size=env.world_size)
        from megamoe.train.loop import run  # heavy imports only once the config is known to be good

        run(cfg)
    except (ConfigError, SharedError):
        if env.rank == 0:
            raise
        # Rank 0 says why. The others step aside with 0: a non-zero exit would make torchrun
        # kill rank 0 before its message is printed.
        sys.exit(0)
    except CollectiveStall as stall:
        if stall.report:
            print(f"error: {stall}", file=sys.stderr, flush=True)
            ErrorHandler().record_exception(stall)  # torchrun's summary names this as the root cause
            reported()
        sys.exit(1)


if __name__ == "__main__":
    main()
