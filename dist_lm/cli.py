"""What every entry script shares: one clear line instead of a traceback, and exit statuses a job script can read.

Errors raised at the boundaries (config, files, checkpoints, data) are dist_lm.errors.UserError and carry the
bad value and the fix; the scripts print that one line on the main process and exit with status 2. So do a
missing or already existing file, a failed write (StorageError) and a diverged loss. Anything else, a plain
ValueError from a bug included, is a bug and keeps its traceback.

Exit statuses of the entry scripts (run directly, or as the worker processes of a launcher):
    0   done
    1   a bug (with its traceback)
    2   bad input or a failed write: fix what the line says, then run again
    3   another process stopped answering within train.stall_timeout_s (StallError): the job ended; run the same
        command with train.resume=latest to continue from the last checkpoint
    75  stopped early on a signal or train.time_limit, after saving a checkpoint: the same command with
        train.resume=latest continues (EX_TEMPFAIL, "try again later": what a job script requeues on)
    130 interrupted by Ctrl-C outside the training loop (inside it, Ctrl-C stops with a checkpoint: 75)
`accelerate launch` reports a worker's non-zero status as its own 1 (or 143 when the launcher itself got SIGTERM);
a job script that must tell the cases apart reads the run directory's status.json (dist_lm.train.logger).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from dist_lm.errors import StallError, StorageError, UserError

USER_ERRORS = (UserError, StorageError, FileNotFoundError, FileExistsError, FloatingPointError)
EXIT_USER_ERROR = 2
EXIT_STALLED = 3
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main` and exit with what it returns (None: 0); an error it raises becomes one `error: <message>` line on
    stderr (from the main process only) and the status above."""
    try:
        code = main()
    except USER_ERRORS as exc:
        rank = getattr(exc, "rank", None)  # set on an error only one rank saw (the trainer's data reads)
        if rank:
            print(f"error: rank {rank}: {exc}", file=sys.stderr)
        else:
            _say(f"error: {exc}")
        sys.exit(EXIT_USER_ERROR)
    except StallError as exc:
        print(f"error: {exc}", file=sys.stderr)  # from whichever rank saw it: the stalled one may be rank 0
        sys.exit(EXIT_STALLED)
    except KeyboardInterrupt:
        _say("error: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


def _say(line: str) -> None:
    # A launcher starts one copy per process: let only rank 0 speak.
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
