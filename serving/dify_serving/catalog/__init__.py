"""The desired state the gateway serves: which models and indexes exist, and their specs.

One interface, chosen once at start (`open_catalog`): on one machine a file under
`DIFY_MIRROR_HOME` that the gateway renders and applies to Ray Serve itself
(`LocalCatalog`); in a cluster the DifyModel/DifyIndex objects in the Kubernetes API,
which the operator applies (`KubernetesCatalog`). What is *running* is not here: that is
the gateway's status cache, read from Ray Serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from dify_serving.errors import DifyError
from dify_serving.specs import DifyIndex, DifyModel, Phase

if TYPE_CHECKING:
    from dify_serving.control import AsyncRayDashboard
    from dify_serving.options import GatewayOptions


class Unreachable(DifyError):
    """A control plane is down: a fixed text (its address and error go to the log)."""

    def __init__(self, what: str, code: str, purpose: str = "") -> None:
        message = f"{what} cannot be reached{purpose}; retry shortly"
        super().__init__(503, code, message, {"Retry-After": "2"})


class Catalog(Protocol):
    #: Seconds between background status refreshes while nothing is loading.
    idle_refresh_s: float

    def models(self) -> dict[str, DifyModel]: ...

    def indexes(self) -> dict[str, DifyIndex]: ...

    async def refresh(self) -> None:
        """Re-read the desired state where it is remote (kept as it was if unreachable)."""
        ...

    async def put_model(self, model: DifyModel) -> Phase:
        """Create or replace `model`; the phase it is in until Serve reports on it."""
        ...

    async def delete_model(self, name: str) -> bool:
        """Remove the model; False when there was none by that name."""
        ...


def open_catalog(options: GatewayOptions, dashboard: AsyncRayDashboard | None) -> Catalog:
    if options.control == "kubernetes":
        from dify_serving.catalog.kubernetes import KubernetesCatalog

        return KubernetesCatalog()
    from dify_serving.catalog.local import LocalCatalog

    return LocalCatalog(options.home, dashboard)
