"""Train a Yuan-style MoE: `torchrun --nproc_per_node=N launch/pretrain.py +exp=NAME [key=value ...]`.

Also runs under the DeepSpeed launcher (`deepspeed --num_gpus N launch/pretrain.py ...`; its
`--local_rank` argument is accepted and ignored, the rank comes from the environment), under
SLURM's `srun` (SLURM_PROCID / SLURM_NTASKS), and as a single plain `python` process.

The config is composed (Hydra) and validated against the world size *before* any process group
starts, so a typo or an impossible layout ends with one line on rank 0 and exit code 2, never a
hang. Errors that every rank meets at once (a full disk during a save, a run directory held by
another run, a diverged run) are agreed between the ranks and likewise reported by rank 0 alone.
Failures that some ranks may meet at about the same time — a missing data file, running out of
memory, Ctrl-C — are said once, by the lowest rank that meets them, and that line is what
torchrun's summary shows as the root cause.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from megamoe.checkpoint.saver import save_threads_running
from megamoe.cli import USER_ERROR_EXIT, exit_on_user_error, exit_with
from megamoe.config import compose
from megamoe.errors import ConfigError, Interrupted, SharedError, UserError
from megamoe.models import validate_config
from megamoe.parallel.mesh import LaunchEnv, read_launch_env
from megamoe.parallel.stall import CollectiveStall, lowest_to_fail, reported

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def hydra_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides, without the `--local_rank=N` that the DeepSpeed launcher appends."""
    return [arg for arg in argv if not arg.startswith("--local_rank")]


def report(line: str, exc: BaseException) -> None:
    """Print the line that tells the user why the job failed; torchrun's summary names it as the root cause."""
    print(line, file=sys.stderr, flush=True)
    ErrorHandler().record_exception(exc)
    reported()  # the ranks that left the report to this one may exit now


def report_once(env: LaunchEnv, line: str, exc: BaseException, code: int) -> NoReturn:
    """Report ``line`` if this is the lowest rank that failed, and exit with ``code``."""
    if lowest_to_fail(env.rank, env.world_size):
        report(line, exc)
    sys.exit(code)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    env = read_launch_env()
    try:
        cfg = compose(hydra_overrides(sys.argv[1:] if argv is None else argv))
        validate_config(cfg, world_size=env.world_size)
        from megamoe.train.loop import run  # heavy imports only once the config is known to be good
        from megamoe.train.oom import explained_out_of_memory

        with explained_out_of_memory(cfg, env.world_size):
            run(cfg)
    except (ConfigError, SharedError):
        if env.rank == 0:
            raise
        # Rank 0 says why. The others step aside with 0: a non-zero exit would make torchrun
        # kill rank 0 before its message is printed.
        sys.exit(0)
    except CollectiveStall as stall:
        if stall.report:
            report(f"error: {stall}", stall)
        sys.exit(1)
    except UserError as exc:  # met by some ranks, perhaps all at once (a missing file, an allocation)
        report_once(env, f"error: {exc}", exc, USER_ERROR_EXIT)
    except KeyboardInterrupt as exc:
        report_once(env, str(exc) if isinstance(exc, Interrupted) else "interrupted (Ctrl-C)", exc, INTERRUPTED_EXIT)


if __name__ == "__main__":
    exit_with(main, save_threads_running)
