"""User-facing errors: one line, exit code 2, no traceback (``DSK_DEBUG=1`` shows it).

    $ dsk show nosuchid
    error: no artifact matches 'nosuchid'; list them with `dsk ls`
"""

from __future__ import annotations


class DskError(Exception):
    """A problem the user can fix: bad input, bad option, missing artifact.

    The message names the problem and the fix. The CLI prints it on one line and exits
    with ``exit_code`` (2 by default) without a traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NotImplementedStage(DskError):
    """A lifecycle stage whose command exists but whose implementation has not landed."""

    def __init__(self, stage: str):
        super().__init__(f"`dsk {stage}` is not implemented yet")
