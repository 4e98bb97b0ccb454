"""Every error the package raises on purpose: one base class, so callers (and the CLI) catch them all at once.

Each one keeps its old built-in base too (``ConfigError`` is still a ``ValueError``), so code that caught
the built-in keeps working. Messages name the file, shard, key or config key, and what to do.
"""
from __future__ import annotations

import sys
from typing import Callable


class DataPruningError(Exception):
    """Base of every error raised on purpose by datapruning; its message is one line meant for the user."""


class ConfigError(DataPruningError, ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


class InputError(DataPruningError, ValueError):
    """An input path, pattern or file cannot be used; the message names it."""


class BadSample(InputError):
    """A sample or shard that cannot be used; the message names the shard and key."""


class UnreadableFile(InputError):
    """An input file's bytes do not parse (not parquet, a cut .npy): skipped and counted, or fatal in strict mode."""


class UnsafeMember(InputError):
    """A tar member that must not be copied (link, device, absolute or '..' path); names shard and member."""


class TruncatedShard(InputError):
    """A tar ends early or is corrupt; the samples before the damage were read, the partial one was not."""


class StageError(DataPruningError, RuntimeError):
    """A stage cannot run (missing upstream output, changed input); the message says what to do."""


class RunNotReady(StageError):
    """A run folder lacks the stage outputs a consumer needs (manifest, teacher outputs)."""


class EncoderError(DataPruningError, RuntimeError):
    """An encoder cannot be built (weights unreachable, random weights not allowed, unknown name)."""


class ClusterError(DataPruningError, ValueError):
    """Clustering input or parameters are unusable (k larger than the samples, bad shapes)."""


class WriteFailed(DataPruningError, OSError):
    """Writing an output failed (disk full, permissions, ...); the message names the file."""


class MissingExtra(DataPruningError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str):
    """``importlib.import_module(module)``, or MissingExtra: ``<what> needs <package>: pip install
    'datapruning[<extra>]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}: pip install 'datapruning[{extra}]'") from exc


class UidNotFound(DataPruningError, KeyError):
    """Asked-for uids are not in the manifest or the teacher outputs; the message names the first one."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


# DataPruningError: every error raised on purpose (readers wrap a library's error on bad input in one, naming
# the file); OSError: the system said no (a full disk, a permission). Anything else is a bug: a traceback.
EXPECTED_ERRORS = (DataPruningError, OSError)


def run_command(prog: str, fn: Callable[[], int], verbose: bool = False) -> int:
    """``fn()`` for a shell (the CLI, the recipes, the trainer): an expected error prints as one line on stderr,
    ``<prog>: error: <message>``, and exits 2 (``verbose`` re-raises it with its traceback)."""
    try:
        return fn()
    except EXPECTED_ERRORS as exc:
        if verbose:
            raise
        message = str(exc)  # each value in it is cut to 200 characters; the whole line is bounded too
        print(f"{prog}: error: {message if len(message) <= 2000 else message[:1997] + '...'}", file=sys.stderr)
        return 2
