"""What every entry script shares: one clear line for bad input instead of a traceback.

Errors raised at the boundaries (config, files, checkpoints, data) are dist_lm.errors.UserError and carry the
bad value and the fix; the scripts print that one line on the main process and exit with status 2. So do a
missing or already existing file and a diverged loss. Anything else, a plain ValueError from a bug included,
is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from dist_lm.errors import StorageError, UserError

USER_ERRORS = (UserError, StorageError, FileNotFoundError, FileExistsError, FloatingPointError)


def run_main(main: Callable[[], object]) -> None:
    """Run `main`; a user error becomes `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except USER_ERRORS as exc:
        # Accelerate's launcher starts one copy per process: let only rank 0 speak.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
