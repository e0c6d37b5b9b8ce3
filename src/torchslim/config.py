"""Config base classes, at the bottom of the import graph: `Strict` (unknown keys are errors) and
`ByVariant` (a config whose keys depend on the variant chosen by one key, such as a technique's
`method`, or the data's `builtin`).

A `ByVariant` field declares the variants it applies to with `Field(..., json_schema_extra=
only("static", "qat"))`; a key given with a value other than its default for a variant it does not
apply to is an error that names the variants that take it, instead of being silently ignored."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class Strict(BaseModel):
    """Unknown keys are errors; a misspelled key never passes silently."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


def only(*variants: str) -> dict:
    """`json_schema_extra` of a field that applies to these variants only."""
    return {"variants": list(variants)}


class ByVariant(Strict):
    variant_key: ClassVar[str] = "method"

    @classmethod
    def chosen_variant(cls, data: dict) -> str:
        return str(data.get(cls.variant_key, cls.model_fields[cls.variant_key].default))

    @model_validator(mode="before")
    @classmethod
    def _keys_fit_variant(cls, data: Any):
        if not isinstance(data, dict):
            return data
        chosen = cls.chosen_variant(data)
        for key, value in data.items():
            name, field = next(
                (
                    (n, f)
                    for n, f in cls.model_fields.items()
                    if key == n
                    or key == f.alias
                    or (f.validation_alias and key in getattr(f.validation_alias, "choices", ()))
                ),
                (None, None),
            )
            variants = (
                (field.json_schema_extra or {}).get("variants")
                if field is not None and isinstance(field.json_schema_extra, dict)
                else None
            )
            if variants and chosen not in variants and value != field.get_default(call_default_factory=True):
                what = cls.variant_key
                raise ValueError(
                    f"'{key}' applies to {what} {' or '.join(variants)}, not {what} {chosen!r}; remove "
                    f"it, or choose {what}: {variants[0]}"
                )
        return data
