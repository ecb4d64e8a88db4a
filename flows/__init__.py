"""Prefect orchestration: the `retrain` flow (flows/retrain.py) and its scheduled deployment (flows/deploy.py)."""

import logging

from tasks.core.stages import DVC_STAGES

# The Prefect client logs every HTTP request at INFO through httpx; `sftflow run -v` still shows them.
logging.getLogger("httpx").setLevel(logging.WARNING)

# What the retrain flow runs, in order: each DVC stage (tasks.core.stages), then register and promote.
FLOW_STAGES: tuple[str, ...] = (*DVC_STAGES, "register", "promote")
