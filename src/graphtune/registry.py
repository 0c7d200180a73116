"""One generic registry: register by name, look up by name, list the names (the timm `_registry.py` pattern).

    MODELS = Registry("model", option="experiment.model")

    @MODELS.register("gwnet")
    def gwnet(bundle, ...): ...

    MODELS.get("gwnet")      # the registered object
    MODELS.names()           # sorted names

Models, strategies and the components later capabilities add (denoisers, pruners, series backbones)
each have one. A duplicate name is a programming error (ValueError naming who registered it first);
an unknown name is the user's (ConfigError naming the option, the unknown name and every known one),
so a typo in params.yaml fails with one line listing what exists.

Registration happens when the module holding the object is imported. A registry knows the modules
that provide its entries (`providers`) and imports them on first use, so a lookup never depends on
who imported what before; a capability adds its entries by being one of them.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from graphtune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind, e.g. Registry("strategy", option="experiment.strategy")."""

    def __init__(self, kind: str, *, option: str, providers: tuple[str, ...] = ()):
        self.kind = kind  # what an entry is, for messages ("model", "strategy", ...)
        self.option = option  # the params entry that names one, for messages ("experiment.model")
        self.providers = providers  # modules whose import registers the built-in entries
        self._entries: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._loaded = not providers

    def register(self, name: str, obj: T | None = None, *, owner: str | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; without `obj`, a decorator that registers what it decorates.

        `owner` names who registered it in the duplicate message (default: the object's module)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._owners[name]})")
            self._entries[name] = entry
            self._owners[name] = owner or getattr(entry, "__module__", type(entry).__module__)
            return entry

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove `name` (for tests that register a throwaway entry)."""
        self._entries.pop(name, None)
        self._owners.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a provider that looks itself up while importing must not recurse
            for module in self.providers:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        """The entry registered as `name`; ConfigError naming the option and every known name otherwise."""
        self._load()
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"{self.option}: unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"
