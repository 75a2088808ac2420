"""The one exception hierarchy of deepinsert.

Every error the library raises on purpose derives from :class:`DeepInsertError`, so a
caller (the CLI, the HTTP service) can tell a user mistake from a bug. Input and
config errors also derive from :class:`ValueError` so ``except ValueError`` works.
"""

from __future__ import annotations


class DeepInsertError(Exception):
    """Base class of every error raised on purpose by deepinsert."""


class InputError(DeepInsertError, ValueError):
    """A call got an argument it cannot use (bad shape, bad k, mismatched image tokens...)."""


class ConfigError(DeepInsertError, ValueError):
    """A config file or config object is invalid (unknown key, out-of-range value...)."""


class DataError(DeepInsertError, ValueError):
    """A dataset file or record is unreadable or malformed."""


class ModelLoadError(DeepInsertError):
    """A model could not be loaded (missing folder, not a LLaVA, bad adapter...)."""


class BundleError(DeepInsertError):
    """A router bundle is missing, corrupt, or inconsistent with its metadata."""


class MissingExtraError(DeepInsertError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""
