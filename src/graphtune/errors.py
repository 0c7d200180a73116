"""User-facing errors and notices.

The CLI turns any GraphTuneError into one line on stderr and exit code 2, and prints GraphTune's warnings
(GraphTuneNotice and its subclasses) as one line `graphtune: notice: ...` through `format_warning`.
"""

from __future__ import annotations

import warnings

_PYTHON_FORMAT = warnings.formatwarning  # Python's own format, for every warning that is not GraphTune's


class GraphTuneError(Exception):
    """Base for errors caused by the user's input (files, options, names), not by a bug."""


class DataError(GraphTuneError, ValueError):
    """A data file is missing, unreadable or inconsistent. The message names the file and the problem."""


class ConfigError(GraphTuneError, ValueError):
    """An option or params.yaml entry is invalid. The message names the option and what was expected."""


class TrainingDiverged(GraphTuneError):
    """A fit's loss or validation metrics became NaN or inf. The message names which, the epoch and the lr."""


class OutputError(GraphTuneError):
    """An output folder cannot be written without losing something GraphTune did not write. One line."""


class GraphTuneNotice(UserWarning):
    """Base for GraphTune's warnings: something the user should know, which GraphTune handled itself."""


class DataNotice(GraphTuneNotice):
    """A data file was not what its record says (e.g. changed after `prepare`); GraphTune rebuilt it."""


def format_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the CLI: GraphTune's warnings (GraphTuneNotice and its subclasses, which
    every warning GraphTune raises is) as one line, every other as Python prints it."""
    if issubclass(category, GraphTuneNotice):
        return f"graphtune: notice: {' '.join(str(message).split())}\n"  # whitespace folded: always one line
    return _PYTHON_FORMAT(message, category, filename, lineno, line)
