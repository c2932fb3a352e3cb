"""megamoe.cli: the exit status a launcher sees, whatever threads are still running."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.pretrain import ROOT

# A daemon thread that stays inside torch's native code, as a checkpoint writer given up
# mid-write does; then the main function ends the run with ``code``.
PROGRAM = textwrap.dedent("""
    import sys, threading, time, torch
    from megamoe.cli import exit_with

    def busy() -> None:
        block = torch.randn(512, 512)
        while True:
            block.numpy().tobytes()
            block @ block

    def main() -> None:
        threading.Thread(target=busy, daemon=True).start()
        time.sleep(0.3)
        print("the run's last line", flush=False)
        {end}

    exit_with(main, lambda: True)
""")


@pytest.mark.parametrize(("end", "status"), [("sys.exit(130)", 130), ("return", 0), ("raise RuntimeError('bug')", 1)])
def test_a_busy_native_thread_does_not_turn_the_exit_status_into_an_abort(end: str, status: int) -> None:
    """Python's shutdown would stop the thread with pthread_exit and abort (SIGABRT, "terminate
    called without an active exception"); exit_with ends the process with the status main chose,
    its output flushed."""
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(end=end)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == status, result.stderr[-2000:]
    assert result.stdout == "the run's last line\n"
    assert "terminate called" not in result.stderr
    assert ("RuntimeError: bug" in result.stderr) == (status == 1)
