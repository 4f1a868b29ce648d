"""The one exception family users see: one line that names what is wrong and how to fix it.

Every command line (``sweeps.run``, ``sweeps.verify``, ``analysis.compare``, ``analysis.mib``) prints the
message of an ``AttrpatchError`` as a single line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class AttrpatchError(ValueError):
    """Bad input to attrpatch; the message names the problem and the fix."""


class ConfigError(AttrpatchError):
    """An option, name or value that cannot be used (sweep config, method options, task options)."""


class ModelError(AttrpatchError):
    """A model that cannot be found, read or loaded."""


class ResultsError(AttrpatchError):
    """A results root that cannot be read, written or trusted."""


class RunError(AttrpatchError):
    """Work that failed while running (a sweep cell, a worker); the message names the cell."""
