"""Prefect flows that chain the stages: build-tiles, cache-tokens, train, evaluate, pipeline, retrain.

Flows compose the thin wrappers in ``tasks/``; the library ``geojepa`` never imports Prefect. Its
loggers are forwarded into the flow runs' logs.
"""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "geojepa")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry

import logging  # noqa: E402

# The extra loggers get Prefect's handlers but inherit the root's level (WARNING in Prefect's logging
# config): without this, the stages' progress lines never reach the flow run's log.
logging.getLogger("geojepa").setLevel(os.environ.get("GEOJEPA_LOG_LEVEL", "INFO"))
