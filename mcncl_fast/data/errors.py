"""The one exception type for user mistakes (bad options, unreadable or malformed data files).

`mcncl_fast.train.UserError` is this class (re-exported there); the command line
prints it as one line, without a traceback.
"""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, no traceback."""
