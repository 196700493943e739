"""The error type for problems with a user's input, which the CLIs report in one line."""


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
