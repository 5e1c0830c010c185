"""jobs.reindex run in this process and SIGKILLed right after one of its steps (jobs.reindex.STEPS):
the crash the fault tests and bench/soak.py exercise, as a real process dying without clean-up.

  python -m jobs.reindex_killed STEP [jobs.reindex arguments...]

Exits by SIGKILL once STEP has run, or normally when the run ends before reaching STEP (a run
with nothing to do never reaches "index_written", for example).
"""
from __future__ import annotations

import os
import signal
import sys

from jobs import reindex


def run_and_kill(argv: list[str]) -> None:
    """Not a user command line (tests/test_cli.py holds those to run_cli): a crash for the fault tests."""
    step, *reindex_argv = argv
    if step not in reindex.STEPS:
        sys.exit(f"reindex_killed: unknown step {step!r}; one of {', '.join(reindex.STEPS)}")

    def kill_after(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    reindex.reindex(reindex.parse_args(reindex_argv), on_step=kill_after)


if __name__ == "__main__":
    run_and_kill(sys.argv[1:])
