"""What can go wrong, sorted by whose fault it is.

A :class:`UserError` is something the person at the keyboard can fix — a bad flag or config value, an input file
that is missing or not what it claims to be, a model directory that is damaged, a run directory in the way. The
CLI prints its message on one line and exits 2. Anything else that escapes is a bug in raeflow (or in a library it
uses) and keeps its traceback, exit 1: a user must never be told "bad input" about a crash, and a developer must
never lose the traceback of one.

Each class also derives from the built-in exception the code raised before the taxonomy existed (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` in callers and ``pytest.raises(ValueError)`` in tests keep
working. Exceptions from other libraries that mean "bad input" (YAML syntax, a corrupt safetensors file, a file
that cannot be opened) are converted once, at the boundary, by :func:`as_user_error`.
"""
from __future__ import annotations


class UserError(Exception):
    """Base: the input, the config or the environment is wrong, not raeflow. One line, exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value (YAML, ``--set``, a flag, a model's saved config.json) is wrong: names the key and
    what it accepts."""


class UnknownNameError(ConfigError, KeyError):
    """A name (variant, dataset, task) that is not registered; a KeyError too, for lookups' callers."""

    __str__ = Exception.__str__  # KeyError's would quote the whole message


class InputError(UserError, ValueError):
    """Input data (a file, a row, a request) cannot be used: names the file or row and why."""


class ModelFileError(InputError):
    """A saved model directory is damaged or implausible (corrupt weights, sizes beyond the limits)."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user named does not exist (or holds nothing raeflow can use)."""


class RunExistsError(UserError, FileExistsError):
    """An output location is taken (a run directory that is not empty, a server already on that port)."""


class UnsupportedError(UserError, NotImplementedError):
    """The model or the setup cannot do what was asked (e.g. sampling from a model without a prior)."""


class ServerError(UserError, RuntimeError):
    """A server could not start or be reached (its cause is in the message: a model that does not load, a port)."""


def as_user_error(e: BaseException) -> UserError | None:
    """The :class:`UserError` an exception stands for, or None when it is a bug (keep the traceback).

    Only types whose every instance means bad input or environment are converted here: YAML syntax, a corrupt
    safetensors file, an OS error about a named path (missing, a folder where a file belongs, no permission) or
    out of disk space. A bare ``ValueError`` from deep inside numpy or torch is a bug and is not converted.
    """
    import errno

    if isinstance(e, UserError):
        return e
    try:
        import yaml

        if isinstance(e, yaml.YAMLError):
            return ConfigError(f"not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                               f"({' '.join(str(e).split())[:300]})")
    except ImportError:  # pragma: no cover - yaml is a dependency
        pass
    if type(e).__name__ == "SafetensorError":  # safetensors_rust.SafetensorError: header/format damage
        return ModelFileError(f"the model's weights file is not valid safetensors ({e})")
    if isinstance(e, OSError) and (e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)):
        what = e.strerror or str(e)
        return InputError(f"{e.filename}: {what}" if e.filename is not None else what)
    return None
