"""Typed settings: each algorithm keeps its settings dataclass beside its code and registers it in
its package's ``SETTINGS`` registry; the Hydra schema (:mod:`diffq.config`) is assembled from those
registries, and the code reads a config section through :func:`typed`."""
from __future__ import annotations

from dataclasses import Field, field, fields, is_dataclass, make_dataclass
from typing import Any, Mapping, TypeVar

from diffq.errors import ConfigError
from diffq.registry import Registry

T = TypeVar("T")


def typed(cls: type[T], values: Mapping[str, Any] | T | None, where: str) -> T:
    """The settings dataclass ``cls`` from a (possibly partial, resolved) config section: unset fields
    keep their defaults; ConfigError naming ``where`` for a key ``cls`` does not have."""
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; {cls.__name__} has {known}")
    return cls(**values)


def with_sections(name: str, base: type, sections: Registry[type]) -> type:
    """The dataclass ``name``: ``base`` extended by one field per registered settings section
    (``section: its dataclass``), so a new section is registered beside its code and no schema lists it."""
    if not is_dataclass(base):
        raise TypeError(f"{base.__name__} is not a dataclass")
    extra: list[tuple[str, type, Field]] = [(name, sections.get(name), field(default_factory=sections.get(name)))
                                            for name in sections.names()]
    cls = make_dataclass(name, extra, bases=(base,))
    cls.__doc__, cls.__module__ = base.__doc__, base.__module__
    return cls
