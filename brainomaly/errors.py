"""The one error type a user sees: a message that names the path and the fix, exit status 2."""
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input (missing folder, unreadable image, missing checkpoint...). run_cli prints it and exits 2."""


def run_cli(main, argv=None):
    """main(argv) for a command line: its return value, or `error: ...` on stderr and exit status 2 on a UserError."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
