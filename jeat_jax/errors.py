"""Errors that main.py reports as one clear line (no traceback)."""


class UserError(Exception):
  """Bad input from the user: a config value, a data file or a workdir."""


class ConfigError(UserError):
  """A config key has a bad value; the message names the key."""


class DataError(UserError):
  """A data file is missing or malformed; the message names the file."""


class WorkdirError(UserError):
  """The workdir holds a run that this config cannot continue."""


class Preempted(Exception):
  """The run was told to stop (SIGTERM, a TPU VM's preemption notice) and saved a checkpoint
  at the step it had reached: a clean exit (status 0), resumed by the same command."""
