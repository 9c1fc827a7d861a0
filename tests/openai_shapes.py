"""Strict parsing with the official `openai` types, for tests of what the simulator sends and what
the export writes. The openai models accept unknown fields and fill in missing optional ones, so
`model_validate` alone is too lenient: these also fail on unknown fields at any depth and on any
value the model had to coerce."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def no_extra_fields(model: Any, where: str = "reply") -> None:
    """No field the openai types do not know, at any depth (their models allow extras)."""
    if isinstance(model, BaseModel):
        assert not model.model_extra, f"{where}: fields unknown to the openai types: {sorted(model.model_extra)}"
        for name in type(model).model_fields:
            no_extra_fields(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list):
        for i, item in enumerate(model):
            no_extra_fields(item, f"{where}[{i}]")


def openai_parse(cls: Any, data: dict[str, Any]) -> Any:
    """Parse with the official type; fail on unknown fields and on anything it had to coerce."""
    parsed = cls.model_validate(data)
    no_extra_fields(parsed)
    assert parsed.model_dump(mode="json", exclude_unset=True) == data
    return parsed
