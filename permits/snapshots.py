"""Stored permit versions are read through the permit schema.

Contract: :func:`read_snapshot` returns a stored snapshot (``permit_versions.snapshot``, JSON)
as the current :class:`~permits.schemas.PermitContent` reads it: a field added to the schema
after the version was written gets its default, nested ones included (e.g. an export policy
stored before ``max_files`` existed). A snapshot that already has every field is returned as
it is, without re-validation (the read path stays one dictionary check). Every reader of
stored versions (terms for enforcement, the public view, history) goes through it.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from permits.schemas import PermitContent


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel an annotation names (``Model`` or ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation)
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


_TOP = frozenset(PermitContent.model_fields)
_NESTED: dict[str, frozenset[str]] = {
    name: frozenset(model.model_fields)
    for name, field in PermitContent.model_fields.items()
    if (model := _model_of(field.annotation)) is not None
}


def is_current(raw: dict[str, Any]) -> bool:
    """Whether ``raw`` already has every field of the current schema (top level and nested)."""
    if not raw.keys() >= _TOP:
        return False
    for name, keys in _NESTED.items():
        value = raw.get(name)
        if isinstance(value, dict) and not value.keys() >= keys:
            return False
    return True


def read_snapshot(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the defaults of the fields it predates (validated by the schema)."""
    if is_current(raw):
        return raw
    return PermitContent.model_validate(raw).model_dump(mode="json")
