"""The one exception type the pipeline raises for bad input or environment."""


class GeoJepaError(ValueError):
    """A problem the user can fix: the message names the file and what is wrong."""
