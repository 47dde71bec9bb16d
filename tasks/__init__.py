"""Thin Prefect ``@task`` wrappers around the ``geojepa`` stage functions: they pass paths, nothing more."""
