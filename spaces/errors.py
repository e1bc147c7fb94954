"""The one error type of the ``spaces`` layer."""

from __future__ import annotations


class SpaceError(ValueError):
    """A search-space file (or a point in it) is invalid.

    The message always names the file, and the bit-width, parameter or starting point at fault,
    so the CLI can print it as-is and exit 2 without a traceback.
    """
