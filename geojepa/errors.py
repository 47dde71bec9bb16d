"""The exception types the pipeline raises for bad input or environment."""


class GeoJepaError(ValueError):
    """A problem the user can fix: the message names the file and what is wrong."""


class TransientError(GeoJepaError):
    """A network or service failure that outlasted this call's own retries; a later try may succeed
    (orchestrators retry these, never plain bad input)."""
