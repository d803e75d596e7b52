"""The desired state the gateway serves: which models and indexes exist, and their specs.

One interface, chosen once at start (`open_catalog`): on one machine a file under
`DIFY_MIRROR_HOME` that the gateway renders and applies to Ray Serve itself
(`LocalCatalog`); in a cluster the DifyModel/DifyIndex objects in the Kubernetes API,
which the operator applies (`KubernetesCatalog`). What is *running* is not here: that is
the gateway's status cache, read from Ray Serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

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


class IndexExists(DifyError):
    """A create names an index that exists, or whose deletion is not finished (as a
    Kubernetes create of an object still terminating): 409, never a silent replace."""

    def __init__(self, name: str, deleting: bool = False) -> None:
        why = "is still being deleted; retry shortly" if deleting else "already exists"
        fix = "" if deleting else f" (DELETE /v1/indexes/{name} first to change its spec)"
        super().__init__(409, "index_exists", f"index {name!r} {why}{fix}")


class CollectionInUse(DifyError):
    """A new index would write into the collection another index owns."""

    def __init__(self, message: str) -> None:
        super().__init__(409, "collection_in_use", message)


@dataclass(frozen=True, slots=True)
class IndexRemoval:
    """What `delete_index` did with the index's vectors (its `reclaimPolicy`)."""

    reclaim_policy: Literal["Retain", "Delete"]
    #: deleted: gone now; retained: kept (on purpose, or why not in `message`);
    #: deleting: the actuator (the operator, or this gateway once the replica stopped)
    #: removes them shortly.
    vectors: Literal["deleted", "retained", "deleting"]
    message: str
    #: False while something still happens after the answer (the replica stopping, the
    #: operator's finalizer): the route answers 202 then, as Kubernetes does.
    done: bool


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

    async def create_index(self, index: DifyIndex) -> Phase:
        """Create `index`; IndexExists when one by that name exists (create, not replace),
        CollectionInUse when another index owns its collection. Returns the phase it is
        in until Serve reports on it."""
        ...

    async def delete_index(self, name: str) -> IndexRemoval | None:
        """Remove the index and, with `reclaimPolicy: Delete`, its vectors once its replica
        is gone; None when there was none by that name."""
        ...


def open_catalog(options: GatewayOptions, dashboard: AsyncRayDashboard | None) -> Catalog:
    if options.control == "kubernetes":
        from dify_serving.catalog.kubernetes import KubernetesCatalog

        return KubernetesCatalog()
    from dify_serving.catalog.local import LocalCatalog

    return LocalCatalog(options.home, dashboard)
