"""`python -m dify_operator`: run the kopf operator with this package's handlers."""

from __future__ import annotations

import asyncio
import logging
import random
import sys

import kopf
from pydantic import ValidationError

from dify_operator import handlers  # noqa: F401  (registers the handlers)
from dify_operator.reconcile import serve_options
from dify_operator.settings import OperatorSettings
from dify_serving.manifests import explain


def main() -> None:
    """Settings and Serve options are built here, once: a bad one ends the start with one
    line (kopf would otherwise retry every reconcile against it forever)."""
    try:
        config = OperatorSettings()
        options = serve_options(config)
    except ValidationError as exc:
        sys.exit(f"dify-operator: bad setting: {explain(exc)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    namespaces = [] if config.cluster_wide else [config.namespace or "default"]
    # kopf pauses every operator that meets a peer of its own priority: a random one per
    # start is kopf's recipe for replicas of one Deployment (one runs, the others wait).
    priority = config.peering_priority
    if priority is None:
        priority = random.randint(1, 32767)
    asyncio.run(
        kopf.operator(
            clusterwide=config.cluster_wide,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
            memo=kopf.Memo(config=config, options=options),
            standalone=not config.peering,
            peering_name=config.peering or None,
            priority=priority,
        )
    )


if __name__ == "__main__":
    main()
