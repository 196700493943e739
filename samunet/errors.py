"""The error types for problems with a user's input, which the CLIs report in one line, and the one
format of such a line when a check finds several problems (:func:`problems_in_one_line`)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping



class SamunetError(Exception):
    """Bad input that samunet explains: what is wrong, where, and how to fix it."""


class UnknownNameError(SamunetError, LookupError):
    """A trainer, backbone or dataset name that samunet does not know."""


class ConfigurationError(SamunetError, ValueError):
    """An option that does not fit (input size of a backbone, depth, fold, configuration)."""


class DatasetError(SamunetError, ValueError):
    """A data set in nnU-Net's raw layout that cannot be used as it is."""


class InputFilesError(DatasetError):
    """Image or label files that samunet cannot use as they are; ``problems`` holds each one found
    (:class:`samunet.input_checks.Problem`), the message lists them grouped by kind."""

    def __init__(self, message: str, problems: tuple = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


def problems_in_one_line(subject: str, problems: Iterable[tuple[str, str]], kinds: Mapping[str, tuple[str, str]], *,
                         max_listed: int, nothing_written: bool = False) -> str:
    """``<subject> has N problem(s).`` followed, per kind (in the order of ``kinds``), by what is wrong, the
    first ``max_listed`` details and how to fix it, all on one line. ``problems`` are ``(kind, detail)`` pairs
    whose kinds are keys of ``kinds`` (kind -> (what is wrong, how to fix it))."""
    found: dict[str, list[str]] = {kind: [] for kind in kinds}
    count = 0
    for kind, detail in problems:
        found[kind].append(detail)
        count += 1
    parts = []
    for kind, details in found.items():
        if details:
            what, fix = kinds[kind]
            more = f"; and {len(details) - max_listed} more" if len(details) > max_listed else ""
            parts.append(f"{what[0].upper()}{what[1:]}: {'; '.join(details[:max_listed])}{more}. Fix: {fix}.")
    written = "; nothing was written" if nothing_written else ""
    return f"{subject} has {count} problem(s){written}. {' '.join(parts)}"
