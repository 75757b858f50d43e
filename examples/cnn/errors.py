"""Errors a user can fix (a flag, the --out directory, its checkpoints).

``python -m examples.cnn.main`` prints them as one line and exits with status 1; called from
Python, :func:`examples.cnn.main.main` raises them. Each is also the built-in exception a caller
would expect (ValueError, FileNotFoundError, FileExistsError).
"""


class UsageError(Exception):
  """Base class: the message is one line that says what to change."""


class FlagError(UsageError, ValueError):
  """A flag's value cannot work with the data or the run being resumed."""


class DataError(UsageError, ValueError):
  """The files in ``--data-dir`` are not valid MNIST-format IDX files."""


class NoCheckpointError(UsageError, FileNotFoundError):
  """``--resume`` found no complete, readable, finite checkpoint."""


class OutDirInUseError(UsageError, FileExistsError):
  """``--out`` holds checkpoints of another run and ``--resume`` was not given."""
