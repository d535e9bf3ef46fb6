"""The errors that mean "bad input": each carries a message that says what to change. Light to import, so the
command line can catch them without loading models or datasets first."""

from __future__ import annotations

from fedlowrank.config import ConfigError


class DataError(ValueError):
    """The dataset cannot be found, read, or split as configured; the message says how to fix it."""


class ModelNotFoundError(ValueError):
    """The model name resolves neither to a local folder, an alias, nor a reachable hub model."""


class AdapterConfigError(ValueError):
    """The adapter settings do not fit the model (unknown target module, rank too large, ...)."""


USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, AdapterConfigError)
