"""The one exception type for bad input: what the entry scripts turn into a single `error:` line.

Design decision: a subclass of ValueError, so library callers that catch ValueError keep working, while
dist_lm.cli.run_main catches only this (plus missing/existing files and a diverged loss). A ValueError from a
bug, in dist_lm or in a library it calls, then keeps its traceback instead of being reduced to one line.
Checks that only code can fail (tensor shapes passed between our own functions, the KV cache's length, a
fused-kernel plan's tensors) stay plain ValueError for that reason; third-party errors caused by a user's file
(not UTF-8, not parquet, not JSON) are caught where the file is read and re-raised as UserError naming it.
"""


class UserError(ValueError):
    """Input that cannot work (config, files, checkpoints, data, arguments); the message names the value and the fix."""


class StorageError(OSError):
    """A write that failed for want of space or permission (a full disk, a read-only directory): the message names
    the path, the free space and what was kept; whatever was written before is left intact."""


class StallError(RuntimeError):
    """A collective failed because another process stopped answering (stalled, stopped, killed) within
    train.stall_timeout_s: the job ends here, and resumes from its last checkpoint."""
