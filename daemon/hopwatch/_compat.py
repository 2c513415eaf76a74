"""What differs between the interpreters hopwatch runs on (CPython >= 3.10, PyPy 3.9)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

PYPY = sys.implementation.name == "pypy"

# `@dataclass(**SLOTS)`: slots where dataclasses offer them (CPython >= 3.10, where they
# save ~100 B per connection object); PyPy's instances are compact without.
SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}


def field_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    """Sets field ``name`` of a (frozen) dataclass instance: the slot's own descriptor
    where the class has slots (twice as fast as the generated ``__init__``), else
    ``object.__setattr__``."""
    attr = cls.__dict__.get(name)
    setter = getattr(attr, "__set__", None)
    if setter is not None:
        return setter  # type: ignore[no-any-return]

    def set_field(obj: Any, value: Any) -> None:
        object.__setattr__(obj, name, value)

    return set_field


# Linux's SCHED_IDLE (include/uapi/linux/sched.h); PyPy 3.9's `os` lacks the name.
SCHED_IDLE: int = getattr(os, "SCHED_IDLE", 5)
