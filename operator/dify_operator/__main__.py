"""`python -m dify_operator`: run the kopf operator with this package's handlers."""

from __future__ import annotations

import asyncio
import logging
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
    asyncio.run(
        kopf.operator(
            clusterwide=config.cluster_wide,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
            memo=kopf.Memo(config=config, options=options),
            standalone=not config.peering,
            peering_name=config.peering or None,
        )
    )


if __name__ == "__main__":
    main()
