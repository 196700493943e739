"""Explicit name -> class tables for trainers, backbones and networks.

Classes register themselves with a decorator where they are defined; a table imports the
package that holds its entries the first time it is asked for a name, so nothing is imported
at ``import samunet`` and lookups never scan the file system. Registering a name twice is an
error, and an unknown name lists the known ones.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from samunet.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries of one kind (e.g. ``"trainer"``)."""

    def __init__(self, kind: str, populate_from: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._populate_from = populate_from
        self._populated = False
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def add(entry: T) -> T:
            key = name or entry.__name__
            if key in self._entries and self._entries[key] is not entry:
                raise ValueError(f"{self.kind} {key!r} is registered twice "
                                 f"({self._entries[key]!r} and {entry!r})")
            self._entries[key] = entry
            return entry
        return add

    def _populate(self) -> None:
        if not self._populated:
            self._populated = True
            for module in self._populate_from:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._populate()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._populate()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        self._populate()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


TRAINERS: Registry = Registry("trainer", ("samunet.trainers",))
BACKBONES: Registry = Registry("backbone", ("samunet.backbones",))
