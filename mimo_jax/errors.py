"""Typed errors: every user-facing failure is one of these, with a one-line message."""


class MimoError(Exception):
    """Base class: launch.py prints `error: <message>` and exits non-zero for these."""


class ConfigError(MimoError, ValueError):
    """A configuration is invalid or of an unknown model type."""


class CheckpointError(MimoError):
    """A checkpoint directory, file or tensor is missing or malformed."""


class InputError(MimoError, ValueError):
    """A prompt or generation request is invalid (empty, too long, token out of range...)."""
