"""The one exception type for bad input: what the entry scripts turn into a single `error:` line.

Design decision: a subclass of ValueError, so library callers that catch ValueError keep working, while
dist_lm.cli.run_main catches only this (plus missing/existing files and a diverged loss). A ValueError from a
bug, in dist_lm or in a library it calls, then keeps its traceback instead of being reduced to one line.
"""


class UserError(ValueError):
    """Input that cannot work (config, files, checkpoints, data, arguments); the message names the value and the fix."""
