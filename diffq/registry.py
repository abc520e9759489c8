"""Name -> implementation registries filled by each module itself (formats, observers, methods,
reconstruction modes, export codecs): adding one is one file and one ``@registry.register``."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Sequence, TypeVar

from diffq.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named registry; ``what`` is the config key users set (e.g. ``quant.method``); the modules of
    ``package`` (one name or several) are imported on first lookup so every module's registration runs."""

    def __init__(self, what: str, package: str | Sequence[str] | None = None) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._packages = (package,) if isinstance(package, str) else tuple(package or ())

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are unique)."""

        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def _load(self) -> None:
        packages, self._packages = self._packages, ()
        for package in packages:
            pkg = importlib.import_module(package)
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{package}.{info.name}")

    def get(self, name: str) -> T:
        """The entry ``name``; ConfigError listing what is registered otherwise."""
        self._load()
        if name not in self._items:
            raise ConfigError(f"unknown {self.what} {name!r}; registered: {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._load()
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items
