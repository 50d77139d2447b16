"""A tiny name -> object registry shared by paths, solvers, grids, families, networks and data sets.

Test matrices are generated from these registries, so nothing registered can skip the property suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes or factories) of one kind.

    >>> r = Registry("colour")
    >>> @r.register("red")
    ... def red(): return "#f00"
    >>> r.get("red")()
    '#f00'

    An alias is a second name of a registered entry: :meth:`get` and ``in`` accept it, :meth:`canonical` turns
    it into the entry's own name, and :meth:`names` (what test matrices and ``--help`` iterate) lists each entry
    once, under its own name; :meth:`aliases` lists the aliases.

    >>> r.alias("rouge", "red")
    >>> r.get("rouge") is r.get("red"), r.canonical("rouge"), r.names()
    (True, 'red', ['red'])
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}  # alias -> the registered name it stands for

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._aliases:
                raise ConfigError(f"{self.kind} {name!r} is already an alias of {self._aliases[name]!r}; pick "
                                  "another name")
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is registered twice; pick another name")
            self._items[name] = obj
            return obj

        return deco

    def alias(self, alias: str, name: str) -> None:
        """Make ``alias`` a second name of the registered ``name`` (itself an entry, not another alias)."""
        if not isinstance(alias, str) or not alias:
            raise ConfigError(f"a {self.kind} alias must be a non-empty string; got {alias!r}")
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise ConfigError(f"cannot alias {alias!r} to {name!r}: no {self.kind} {name!r} is registered (an alias "
                              f"names a registered entry, one of: {known})")
        if alias in self._items:
            raise ConfigError(f"{self.kind} {alias!r} is a registered entry; an alias needs a name of its own")
        if self._aliases.get(alias, name) != name:
            raise ConfigError(f"{self.kind} alias {alias!r} already stands for {self._aliases[alias]!r}; pick "
                              "another alias")
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (itself, or the entry an alias names); unknown: ConfigError."""
        if isinstance(name, str) and name in self._aliases:
            return self._aliases[name]
        if not isinstance(name, str) or name not in self._items:
            known = ", ".join(sorted(self._items))
            aliases = ", ".join(f"{a} = {n}" for a, n in sorted(self._aliases.items()))
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {known}"
                              + (f" (aliases: {aliases})" if aliases else ""))
        return name

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def unregister(self, name: str) -> None:
        """Remove the entry ``name`` and its aliases (an alias: that alias only)."""
        if name in self._aliases:
            del self._aliases[name]
            return
        if name not in self._items:
            raise ConfigError(f"{self.kind} {name!r} is not registered")
        del self._items[name]
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}

    def names(self) -> list[str]:
        """The registered entries' own names, sorted (aliases not repeated: see :meth:`aliases`)."""
        return sorted(self._items)

    def aliases(self) -> dict[str, str]:
        """``{alias: registered name}``."""
        return dict(sorted(self._aliases.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
