"""User-facing errors: one line that says what is wrong and what to do."""


class WanError(Exception):
    """An error the CLI prints as one line (exit code 2) instead of a traceback.

    ``hint`` says what the user can do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
