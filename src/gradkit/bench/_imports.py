"""Resolve ``package.module:attr`` strings (user workloads and optimizers) with one-line errors."""

from __future__ import annotations

import importlib
import re
from typing import Any

from gradkit.errors import UsageError

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_spec(text: str) -> bool:
    """True if ``text`` looks like ``module:attr`` (it contains a colon)."""
    return ":" in text


def load_attr(spec: str, what: str) -> Any:
    """Import ``package.module:attr`` and return the attribute.

    ``what`` names the kind of object for error messages ("workload", "optimizer").
    Every failure is a :class:`UsageError` with one line saying what is wrong.
    """
    if not _SPEC.match(spec):
        raise UsageError(
            f"malformed {what} {spec!r}: expected 'package.module:attribute' "
            "(dotted module path, one colon, attribute name)"
        )
    module_name, attr_path = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the user's module raised while importing
        raise UsageError(
            f"{what} {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"{what} {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    return obj
