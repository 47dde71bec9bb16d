"""Prefect flows that chain the stages (build-tiles, cache-tokens, train, evaluate, pipeline).

Flows compose the thin wrappers in ``tasks/``; the library ``geojepa`` never imports Prefect.
"""
