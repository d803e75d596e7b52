"""One router per area; `register` mounts those of the enabled modules."""

from __future__ import annotations

from fastapi import FastAPI

from dify_serving.gateway.routers import (
    admin,
    data,
    feedback,
    health,
    indexes,
    inference,
    metrics,
    models,
    openai_compat,
    tasks,
)

ROUTERS = {
    "models": models.router,
    "inference": inference.router,
    "openai": openai_compat.router,
    "data": data.router,
}
#: Modules whose work can run as tasks: with any of them on, the task routes are too.
TASK_MODULES = ("inference", "data")


def register(app: FastAPI, modules: list[str]) -> None:
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    if any(module in modules for module in TASK_MODULES):
        app.include_router(tasks.router)
    if "inference" in modules:
        app.include_router(tasks.submit_router)
    for module in modules:
        if module == "models":  # first: /v1/models/feedback is no model's name
            app.include_router(feedback.router)
        app.include_router(ROUTERS[module])
    if "data" in modules:  # the indexes the data routes write: list, create, delete
        app.include_router(indexes.router)
