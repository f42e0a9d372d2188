"""What the config dataclasses (EncoderConfig, FbankConfig, AdapterConfig) share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """`cls(**data)` from a plain mapping (YAML, a saved file); unknown keys are an error
    naming them and the known ones."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**data)
