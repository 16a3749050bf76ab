"""Writes that fail for want of space or permission: which failures those are, and the figures their one-line
messages give (free space, sizes). Shared by checkpoints (dist_lm.train.checkpoint) and token shards
(dist_lm.data.shards), which each say what they kept and how to go on."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

# errno values that mean "no room or no right to write here": the user can fix them, so they are one line
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
PERMISSION_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a write that failed for want of space or permission, else None. safetensors reports the OS
    error inside its message ("... No space left on device (os error 28)")."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    return code if code in SPACE_ERRNOS + PERMISSION_ERRNOS else None


def free_space(path: Path) -> str:
    """Free space on the filesystem holding `path` (or its nearest existing parent), for an error message."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return format_bytes(shutil.disk_usage(path).free)
    except OSError:
        return "unknown space"


def format_bytes(n: int) -> str:
    """Bytes for a message: '812 KiB', '7.4 MiB', '1.21 GiB'.

    >>> format_bytes(7_800_000)
    '7.4 MiB'
    """
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"
