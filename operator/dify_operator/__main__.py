"""`python -m dify_operator`: run the kopf operator with this package's handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf

from dify_operator import handlers  # noqa: F401  (registers the handlers)
from dify_operator.settings import OperatorSettings


def main() -> None:
    config = OperatorSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    namespaces = [] if config.cluster_wide else [config.namespace or "default"]
    asyncio.run(
        kopf.operator(
            clusterwide=config.cluster_wide,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
            memo=kopf.Memo(config=config),
            standalone=not config.peering,
            peering_name=config.peering or None,
        )
    )


if __name__ == "__main__":
    main()
