"""Errors a user can act on, and the exit codes of the command line (docs/reliability.md).

Every error here carries a one-line message that names the option or file, what is wrong, and the fix; the CLI
prints it as ``error: ...`` and exits with the class's ``exit_code``, never with a traceback.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected internal error (a bug: the traceback is printed)
EXIT_BAD_INPUT = 2  # a bad option, recipe value, data path, weights or checkpoint file, or a busy output folder
EXIT_STOPPED = 3  # stopped by SIGTERM / SIGINT / SIGUSR1 (or --requeue's warning) after saving: rerun to resume
EXIT_DIVERGED = 4  # the divergence guard stopped the run
EXIT_SAVE_FAILED = 5  # a checkpoint or another output could not be written (disk full, permissions)


class MimkitError(Exception):
    """Base of the errors the CLI reports as one line."""

    exit_code = EXIT_BAD_INPUT

    def __str__(self) -> str:  # one line, whatever the message was built from
        text = super().__str__()
        if "Traceback (most recent call last)" in text:  # re-raised by PyTorch from a data-loader worker
            last = [line for line in text.splitlines() if line.strip()][-1].strip()
            m = re.match(r"^[\w.]+(Error|Exception): (.*)$", last)
            text = (m.group(2) if m else last) + " (raised in a data-loader worker)"
        return " ".join(text.split())


class ConfigError(MimkitError, ValueError):
    """A configuration problem; the message names the option, the value and the valid range."""


class DataError(MimkitError, ValueError):
    """A data problem the user can fix; the message names the path and the fix."""


class CheckpointError(MimkitError, RuntimeError):
    """An unreadable, foreign or mismatched weights or checkpoint file; the message names the file."""


class RunLockedError(MimkitError, RuntimeError):
    """The output folder is used by another live run."""


class TrainingDiverged(MimkitError, RuntimeError):
    """The divergence guard stopped the run; the message names the checkpoint a restart will use."""

    exit_code = EXIT_DIVERGED


class RankLost(MimkitError, RuntimeError):
    """A collective across ranks failed or timed out: another process of the run died or stopped responding."""

    exit_code = EXIT_FAILED


class SaveFailed(MimkitError, RuntimeError):
    """A checkpoint could not be written or did not verify; the previous verified one is untouched."""

    exit_code = EXIT_SAVE_FAILED
