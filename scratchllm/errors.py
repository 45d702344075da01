"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(ValueError):
    """Bad input a user can correct: the message says what was wrong and what to do."""
