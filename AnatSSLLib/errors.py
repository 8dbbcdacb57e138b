"""Exception types shared by the whole library.

Every error a user can cause (a bad file, a wrong dimension, an unknown encoder) is raised as one
of these, with a message that names the input, what was expected and what was found, so that the
command line can print it as one line and the Slicer module can show it to a clinician.
"""

from __future__ import annotations

__all__ = ["AnatSSLError", "InputError", "CacheError"]


class AnatSSLError(Exception):
    """Base class of every error AnatSSL raises on purpose."""


class InputError(AnatSSLError, ValueError):
    """An input (file, array, point, option) is missing, unreadable or not what was expected."""


class CacheError(AnatSSLError):
    """An encoder cache entry is missing, incomplete, tampered with or of the wrong kind."""
