"""The single error type raised for files that cannot be loaded."""


class PersistError(ValueError):
    """A persisted file is corrupt, truncated, of an unknown version, or describes disallowed data."""
