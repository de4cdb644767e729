"""One error type for everything a user can get wrong; the CLI turns it into one line and exit code 2."""

from __future__ import annotations


class MoesiftError(Exception):
    """A problem with the user's input or files, explained in one line (what failed, and the fix)."""
