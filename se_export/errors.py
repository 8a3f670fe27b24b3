"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``SEError`` messages without a traceback; anything else is a bug and keeps its
traceback.
"""


class SEError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
