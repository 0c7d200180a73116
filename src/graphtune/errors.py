"""User-facing errors. The CLI turns any GraphTuneError into one line on stderr and exit code 2."""


class GraphTuneError(Exception):
    """Base for errors caused by the user's input (files, options, names), not by a bug."""


class DataError(GraphTuneError, ValueError):
    """A data file is missing, unreadable or inconsistent. The message names the file and the problem."""


class ConfigError(GraphTuneError, ValueError):
    """An option or params.yaml entry is invalid. The message names the option and what was expected."""
