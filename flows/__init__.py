"""Prefect orchestration: the `retrain` flow (flows/retrain.py) and its scheduled deployment (flows/deploy.py)."""

import logging

# The Prefect client logs every HTTP request at INFO through httpx; `sftflow run -v` still shows them.
logging.getLogger("httpx").setLevel(logging.WARNING)
