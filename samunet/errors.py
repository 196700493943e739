"""The error type for problems with a user's input, which the CLIs report in one line."""


class SamunetError(Exception):
    """Bad input that samunet explains: what is wrong, where, and how to fix it."""


class UnknownNameError(SamunetError, LookupError):
    """A trainer, backbone or dataset name that samunet does not know."""


class ConfigurationError(SamunetError, ValueError):
    """An option that does not fit (input size of a backbone, depth, fold, configuration)."""


class DatasetError(SamunetError, ValueError):
    """A data set in nnU-Net's raw layout that cannot be used as it is."""
