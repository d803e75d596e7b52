"""One router per area; `register` mounts those of the enabled modules."""

from __future__ import annotations

from fastapi import FastAPI

from dify_serving.gateway.routers import admin, data, health, inference, models, openai_compat

ROUTERS = {
    "models": models.router,
    "inference": inference.router,
    "openai": openai_compat.router,
    "data": data.router,
}


def register(app: FastAPI, modules: list[str]) -> None:
    app.include_router(health.router)
    app.include_router(admin.router)
    for module in modules:
        app.include_router(ROUTERS[module])
