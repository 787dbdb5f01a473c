"""The one error type btx raises for bad input.

The CLI turns a BtxError into a single line on stderr and exit status 2; anything
else is a bug and keeps its traceback. Messages name the file, key or tensor at
fault and say what was expected.
"""


class BtxError(Exception):
    """Bad input from the user: a recipe, a checkpoint, a data file or a flag."""
