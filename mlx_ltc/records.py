"""Typed JSON records: what one stage hands the next (the analysis, the dataset's metadata, the memory
profile) and writes as a JSON file. `to_json` gives the file's mapping; `from_json` reads one back,
nested records included, and gives a field an older file lacks its default."""

import dataclasses
import types
import typing

from mlx_ltc.errors import UserError


class Record:
    """Mixin for dataclasses whose fields are JSON values, records, or dicts/lists of records."""

    def to_json(self) -> dict:
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = ""):
        if not isinstance(data, dict):
            raise UserError(f"{source or cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise UserError(f"{source or cls.__name__}: missing {', '.join(missing)}")
        return cls(**{k: _load(hints[k], v, source) for k, v in data.items() if k in known})


def _dump(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _load(hint, value, source: str):
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        return _load(next(a for a in args if a is not type(None)), value, source)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_json(value, source)
    if origin is dict and len(args) == 2:
        return {k: _load(args[1], v, source) for k, v in value.items()}
    if origin is list and args:
        return [_load(args[0], v, source) for v in value]
    return value
