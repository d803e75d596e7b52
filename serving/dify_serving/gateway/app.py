"""The gateway application: FastAPI built per replica, served as a Ray Serve ingress.

The FastAPI app is built inside the replica (`__serve_build_asgi_app__`), from the options
in the Serve config, so switched-off modules have no routes at all (404).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from dify_serving.gateway import errors, routers
from dify_serving.gateway.state import GatewayState
from dify_serving.render import GatewayOptions


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(
        title="dify-mirror",
        version="0.1.0",
        description="Serve models and the knowledge they answer from. "
        'Errors are JSON: {"error": {"code", "message", "request_id"}}.',
    )
    app.state.gateway = state
    errors.install(app)
    routers.register(app, state.options.modules)
    return app


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, **options: Any) -> None:
        self.state = GatewayState(GatewayOptions.model_validate(options))

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.state.start()
        return create_app(self.state)


def build_gateway_app(args: dict[str, Any]) -> Any:
    """Serve application builder (the `import_path` of the gateway app)."""
    deployment: Any = Gateway
    return deployment.bind(**GatewayOptions.model_validate(args).model_dump())
