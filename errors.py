"""The one error type a user sees: a message that names the path and the fix, exit status 2."""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input (missing folder, unreadable image, missing checkpoint...). main.py prints it and exits 2."""
