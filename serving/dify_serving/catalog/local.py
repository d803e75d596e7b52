"""The desired state on one machine: the state file, rendered and applied by the gateway.

A change (`put_model`, `delete_model`) is written to the file under its lock, then the
whole state is rendered and applied to Ray Serve through the dashboard, exactly as the
operator does in a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from dify_serving.catalog import Unreachable
from dify_serving.catalog.files import LocalStateStore
from dify_serving.control import AsyncRayDashboard, RayUnavailable
from dify_serving.errors import DifyError
from dify_serving.manifests import DesiredState
from dify_serving.options import ServeOptions
from dify_serving.render import render_serve_config
from dify_serving.specs import DifyIndex, DifyModel, Phase

log = logging.getLogger(__name__)


class LocalCatalog:
    idle_refresh_s = 5.0

    def __init__(self, home: str | Path, dashboard: AsyncRayDashboard | None) -> None:
        self.file = LocalStateStore(home)
        self.dashboard = dashboard

    def models(self) -> dict[str, DifyModel]:
        return self.file.load()[0].models

    def indexes(self) -> dict[str, DifyIndex]:
        return self.file.load()[0].indexes

    def serve_options(self) -> ServeOptions:
        return self.file.load()[1]

    async def refresh(self) -> None:
        """Nothing to do: the file is re-read when it changes."""

    async def put_model(self, model: DifyModel) -> Phase:
        def change(state: DesiredState, _: Any) -> None:
            state.models[model.name] = model

        await self._apply(*await asyncio.to_thread(self.file.update, change))
        return Phase.LOADING

    async def delete_model(self, name: str) -> bool:
        if name not in self.models():
            return False

        def change(state: DesiredState, _: Any) -> None:
            state.models.pop(name, None)

        await self._apply(*await asyncio.to_thread(self.file.update, change))
        return True

    async def _apply(self, state: DesiredState, options: ServeOptions) -> None:
        if self.dashboard is None:
            raise DifyError(503, "no_control", "this gateway has no Ray dashboard to apply changes")
        try:
            await self.dashboard.put_applications(render_serve_config(state, options))
        except RayUnavailable as exc:
            log.warning("applying the Serve config failed: %s", exc)
            raise Unreachable("Ray Serve", "ray_unavailable", " to apply the change") from None
