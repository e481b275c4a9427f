"""User-facing errors: one line naming the bad value and what is allowed."""


class KVForgeError(ValueError):
    """A user mistake (bad argument, missing model, unsupported model). The CLI prints it as one line."""
