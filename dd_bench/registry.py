"""One small generic registry for methods, datasets and models.

A registry maps names (and aliases) to objects registered with a decorator. Entries from
other installed packages are found through a Python entry-point group, so a user's own
package can add a method without touching dd-bench: in its ``pyproject.toml``::

    [project.entry-points."dd_bench.methods"]
    my_method = "my_package.my_module"

Importing the entry point's module runs its ``@register_method`` decorators.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from dd_bench.errors import ConfigError, UnknownNameError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object table filled by decorators, with aliases and plugin discovery.

    ``kind`` is the word used in messages ("method", "dataset", "model");
    ``builtin_modules`` are imported on first lookup so the built-in entries exist;
    ``entry_point_group`` names the group scanned for third-party entries;
    ``base`` (a class) makes registration refuse anything that is not a subclass of it;
    without it, entries must be callable (factories, loaders).
    """

    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = (), entry_point_group: str | None = None,
                 base: type | None = None):
        self.kind = kind
        self.base = base
        self._builtin_modules = builtin_modules
        self._entry_point_group = entry_point_group
        # Lookup is case-insensitive; the name as registered is kept for display.
        self._entries: dict[str, T] = {}
        self._display: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("dm", "distribution_matching")``."""

        def decorator(obj: T) -> T:
            self.add(name, obj, *aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T, *aliases: str) -> None:
        self._check_type(name, obj)
        key = self._normalise(name)
        if key in self._entries and self._entries[key] is not obj:
            existing = self._entries[key]
            # Re-importing the same module (e.g. under pytest) re-registers an equal object.
            if getattr(existing, "__qualname__", None) != getattr(obj, "__qualname__", object()):
                raise ConfigError(f"{self.kind} name '{name}' is already registered to {existing!r}")
        self._entries[key] = obj
        self._display[key] = name
        for alias in aliases:
            self._aliases[self._normalise(alias)] = key

    def _check_type(self, name: str, obj: object) -> None:
        if self.base is not None:
            if not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise ConfigError(f"{self.kind} '{name}': {obj!r} is not a subclass of {self.base.__name__}")
        elif not callable(obj):
            raise ConfigError(f"{self.kind} '{name}': {obj!r} is not callable")

    # -- lookup -------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self._load()
        key = self._normalise(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            available = ", ".join(self.names())
            raise UnknownNameError(f"Unknown {self.kind} '{name}'. Available: {available}")
        return self._entries[key]

    def canonical(self, name: str) -> str:
        """The name as registered for ``name`` or one of its aliases (any case)."""
        self.get(name)
        key = self._normalise(name)
        return self._display[self._aliases.get(key, key)]

    def names(self, pattern: str = "*") -> list[str]:
        self._load()
        wanted = self._normalise(pattern)
        return sorted((self._display[k] for k in self._entries if fnmatch.fnmatch(k, wanted)), key=str.lower)

    def aliases_of(self, name: str) -> list[str]:
        key = self._normalise(self.canonical(name))
        return sorted(a for a, target in self._aliases.items() if target == key)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        self._load()
        key = self._normalise(name)
        return self._aliases.get(key, key) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- internals ----------------------------------------------------------------------
    @staticmethod
    def _normalise(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        if self._entry_point_group:
            for entry in entry_points(group=self._entry_point_group):
                try:
                    entry.load()
                except Exception as error:  # a broken plugin must not take the harness down
                    log.warning("could not load %s plugin %r: %s", self.kind, entry.name, error)
