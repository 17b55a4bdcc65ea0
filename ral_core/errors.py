"""User-facing errors: one clear line that says what to fix (front ends print it without a traceback)."""


class RALError(Exception):
    """An error caused by user input or environment, with a message that says what to fix."""
