"""The error hierarchy. Entry points turn these into a message on stderr and an exit status."""


class ShrinkflowError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1


class ConfigError(ShrinkflowError):
    """params.yaml (or another config file) is invalid: `<file>: <key.path>: <problem>`."""

    exit_code = 2


class DataError(ShrinkflowError):
    """A dataset file cannot be used at all (not JSON, wrong top-level structure, ...)."""


class DataQualityError(ShrinkflowError):
    """Label QA found more problems than `label_qa.max_error_rate` allows."""


class GateFailed(ShrinkflowError):
    """A numeric gate (parity, KPI) was not met."""


class StageFailed(ShrinkflowError):
    """A pipeline stage (or a DVC command) run by the Prefect flow failed; the message ends with
    the stage's own error output."""
