"""Config base classes, at the bottom of the import graph: `Strict` (unknown keys are errors) and
`ByVariant` (a config whose keys depend on the variant chosen by one key, such as a technique's
`method`, or the data's `builtin`).

A `ByVariant` field declares the variants it applies to with `Field(..., json_schema_extra=
only("static", "qat"))`; a key given for a variant it does not apply to (even at its default value)
is an error that names the variants that take it, instead of being silently ignored; dumped
settings hold only the chosen variant's keys."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator


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
        known = {v for f in cls.model_fields.values() for v in _variants(f) or ()}
        if chosen not in known:  # an unknown variant: its own field's check says so, with the choices
            return data
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
            variants = _variants(field) if field is not None else None
            if variants and chosen not in variants:  # even at its default: a key that does nothing is a mistake
                what = cls.variant_key
                raise ValueError(
                    f"'{key}' applies to {what} {' or '.join(variants)}, not {what} {chosen!r}; remove "
                    f"it, or choose {what}: {variants[0]}"
                )
        return data

    @model_serializer(mode="wrap")
    def _applicable_keys_only(self, handler):
        """Dumped settings hold only the keys of the chosen variant, so they parse back as they are."""
        data = handler(self)
        chosen = type(self).chosen_variant({name: getattr(self, name) for name in type(self).model_fields})
        for name, field in type(self).model_fields.items():
            variants = _variants(field)
            if variants and chosen not in variants and isinstance(data, dict):
                data.pop(field.serialization_alias or name, None)
        return data


def _variants(field) -> list[str] | None:
    """The variants a field applies to (None: every variant)."""
    extra = field.json_schema_extra
    return extra.get("variants") if isinstance(extra, dict) else None
