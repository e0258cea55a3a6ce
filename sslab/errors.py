"""One exception type for problems the user can fix; entry points print it as one line."""


class SSLabError(RuntimeError):
    """A user-facing error whose message says what went wrong and what to do about it."""
