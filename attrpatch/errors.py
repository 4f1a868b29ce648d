"""The one exception type users see: a message that names what is wrong and how to fix it."""


class AttrpatchError(ValueError):
    """Bad input to attrpatch; the message names the problem and the fix."""
