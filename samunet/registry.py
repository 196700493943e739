"""Explicit name -> class tables for trainers, backbones and networks.

Classes register themselves with a decorator where they are defined; a table imports the
package that holds its entries the first time it is asked for a name, so nothing is imported
at ``import samunet`` and lookups never scan the file system. Registering a name twice is an
error, and an unknown name lists the known ones.
"""
from __future__ import annotations

import importlib
import inspect
import os
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
        """Decorator adding ``entry`` under ``name`` (default: its ``__name__``).

        Registering another object under a taken name raises ValueError, except for the same definition
        imported a second time under another module name (nnunetv2's ``nnUNet_extTrainer`` search imports
        trainer files by path): the first registration stays.
        """
        def add(entry: T) -> T:
            key = name or entry.__name__
            known = self._entries.get(key)
            if known is not None and known is not entry and not _same_definition(known, entry):
                raise ValueError(f"{self.kind} {key!r} is registered twice "
                                 f"({self._entries[key]!r} and {entry!r})")
            self._entries.setdefault(key, entry)
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


def _same_definition(first: object, second: object) -> bool:
    """True when two classes are one definition (same qualified name, same source file) imported twice."""
    try:
        files = [os.path.realpath(inspect.getfile(entry)) for entry in (first, second)]
    except TypeError:  # not a class or function defined in a file
        return False
    return getattr(first, "__qualname__", None) == getattr(second, "__qualname__", None) and files[0] == files[1]


# samunet.trainers.nnunet_unet: nnU-Net's own trainer and 2d U-Net on samunet's plans (comparisons)
TRAINERS: Registry = Registry("trainer", ("samunet.trainers", "samunet.trainers.nnunet_unet"))
BACKBONES: Registry = Registry("backbone", ("samunet.backbones",))
