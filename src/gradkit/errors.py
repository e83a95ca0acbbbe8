"""Exceptions shared across gradkit."""

from __future__ import annotations


class GradkitError(Exception):
    """Base class of gradkit's own errors."""


class UsageError(GradkitError, ValueError):
    """Bad user input (unknown name, malformed spec, invalid number).

    The CLI turns it into exit code 2 and one line on stderr.
    """


class MissingExtraError(GradkitError, ImportError):
    """An optional dependency is needed; the message says which ``pip install`` fixes it."""


def require_extra(module: str, extra: str, feature: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming ``gradkit[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the optional package '{module}': pip install 'gradkit[{extra}]'"
        ) from exc
