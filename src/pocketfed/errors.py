"""The one exception type that speaks to the user.

Raise `UserError` with one clear sentence naming the file, field or value and what would be valid.
The CLI prints its message and exits non-zero, never a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (file, field, value); its message is shown as is."""
