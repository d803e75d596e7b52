"""Places outside the audit database that keep the chain's head: a file, Redis, a ConfigMap.

Someone who can delete rows from the audit database should not also be able to erase the
record of how long the chain was. So the head goes to every place configured, each with
its own access control:

* a file under `DIFY_MIRROR_HOME` (`audit-checkpoint.json`, mode 0600, replaced
  atomically; an advisory lock orders the processes sharing the home);
* Redis when `DIFY_MIRROR_REDIS_URL` is set (`dm:audit:checkpoint:<chain id>`, so
  installs sharing one Redis never meet; WATCH/MULTI orders the replicas);
* in a cluster, the ConfigMap named by `DIFY_MIRROR_AUDIT_CONFIGMAP` (the manifests use
  `dify-mirror-audit-checkpoint`), which the chart creates and the gateway may only get
  and patch (never create or delete); the patch carries the resourceVersion it read, so
  replicas never overwrite each other blindly. It is named explicitly rather than turned
  on whenever a service-account token is mounted: tests and tools that happen to run in
  a pod must not start calling the API server.

Every update is read, judged, then written as one compare-and-set: the writer's `step`
sees the current checkpoint and returns the next one, or None to leave it (it refuses to
move a checkpoint that the chain no longer holds, which would hide a missing tail). A
place that cannot be read raises `CheckpointError`; its message names the place, never
a secret. The places are plain data (`CheckpointPlaces`) so the writer process receives
them through its stdin with the database URL.

There is no MAC on the checkpoint itself. A head `(seq, hash)` is already keyed: without
the key nobody can produce a pair that matches a chain, so a forged checkpoint is caught
as a mismatch. The one forgery a MAC would not stop either is replaying an older genuine
checkpoint; that is answered by keeping several independent copies (file, Redis,
ConfigMap), by the writer never moving a checkpoint back or past a break, and by each
place's own access control (the gateway may only patch its ConfigMap).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx
import redis

from dify_serving.kube import KubernetesUnavailable, cluster_access
from dify_serving.security.audit.chain import CHAIN_VERSION
from dify_serving.security.secrets import write_private
from dify_serving.specs import is_name

FILE_NAME = "audit-checkpoint.json"
REDIS_PREFIX = "dm:audit:checkpoint:"
CONFIGMAP = "dify-mirror-audit-checkpoint"
CONFIGMAP_KEY = "checkpoint"
CONFIGMAP_VARIABLE = "DIFY_MIRROR_AUDIT_CONFIGMAP"
TIMEOUT_S = 2.0
_HASH = re.compile(r"[0-9a-f]{64}")
_CHAIN_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The head as it was at `time`, kept outside the database; `source` says where."""

    seq: int
    hash: str
    time: float
    chain: str
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": CHAIN_VERSION,
                "chain": self.chain,
                "seq": self.seq,
                "hash": self.hash,
                "time": self.time,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Checkpoint:
        """Parse what `to_json` wrote; ValueError for anything else."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("version") != CHAIN_VERSION:
            raise ValueError(f"{source}: not an {CHAIN_VERSION} checkpoint")
        seq, digest, stamp, chain = (data.get(k) for k in ("seq", "hash", "time", "chain"))
        if (
            type(seq) is not int
            or not 0 <= seq < 2**63
            or not isinstance(digest, str)
            or not _HASH.fullmatch(digest)
            or not isinstance(stamp, int | float)
            or isinstance(stamp, bool)
            or not math.isfinite(stamp)
            or not isinstance(chain, str)
            or not _CHAIN_ID.fullmatch(chain)
        ):
            raise ValueError(f"{source}: malformed checkpoint")
        return cls(seq, digest, float(stamp), chain, source)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "time": self.time, "source": self.source}


#: Gets the current checkpoint (None: none yet), returns the next (None: leave it).
Step = Callable[[Checkpoint | None], Checkpoint | None]


class CheckpointError(RuntimeError):
    """A place cannot be read or written; the message names the place, never a secret."""


class CheckpointPlace(Protocol):
    source: str

    def read(self) -> Checkpoint | None: ...

    def update(self, step: Step) -> bool: ...

    def close(self) -> None: ...


class FileCheckpoint:
    """`audit-checkpoint.json` under the home, replaced atomically under an advisory lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.source = f"file {self.path}"

    def read(self) -> Checkpoint | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise CheckpointError(f"{self.source}: {err.strerror}") from None
        return _parse(text, self.source)

    def update(self, step: Step) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(
            self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            new = step(self.read())
            if new is None:
                return False
            write_private(self.path, new.to_json() + "\n")
            return True
        finally:
            os.close(lock)  # releases the lock

    def close(self) -> None:
        pass


class RedisCheckpoint:
    """One Redis string per chain, changed with WATCH/MULTI (a lost race waits for next time)."""

    def __init__(self, url: str, key: str) -> None:
        self.key = key
        self.source = f"redis {key}"
        self._client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )

    def read(self) -> Checkpoint | None:
        try:
            raw = self._client.get(self.key)
        except redis.RedisError as err:
            raise CheckpointError(f"{self.source}: {type(err).__name__}: {err}") from None
        return None if raw is None else _parse(raw, self.source)

    def update(self, step: Step) -> bool:
        try:
            with self._client.pipeline() as pipe:
                pipe.watch(self.key)
                raw = pipe.get(self.key)
                new = step(None if raw is None else _parse(raw, self.source))
                if new is None:
                    return False
                pipe.multi()
                pipe.set(self.key, new.to_json())
                pipe.execute()
                return True
        except redis.WatchError:
            return False
        except redis.RedisError as err:
            raise CheckpointError(f"{self.source}: {type(err).__name__}: {err}") from None

    def close(self) -> None:
        self._client.close()


class ConfigMapCheckpoint:
    """A key of a ConfigMap the gateway may get and patch; a patch names the version it read."""

    def __init__(
        self, api: str, namespace: str, name: str = CONFIGMAP, token: str | None = None
    ) -> None:
        if not is_name(name):
            raise ValueError(f"the audit checkpoint's ConfigMap name must be a DNS label: {name!r}")
        access = cluster_access(api, token, namespace)  # the namespace is checked there
        self.source = f"configmap {access.namespace}/{name}"
        self.url = f"{access.api}/api/v1/namespaces/{access.namespace}/configmaps/{name}"
        self._client = httpx.Client(
            timeout=TIMEOUT_S, headers=access.headers(), verify=access.verify
        )

    def read(self) -> Checkpoint | None:
        return self._get()[0]

    def update(self, step: Step) -> bool:
        old, version = self._get()
        if version is None:
            raise CheckpointError(
                f"{self.source} does not exist: the chart creates it "
                "(the gateway may only get and patch it)"
            )
        new = step(old)
        if new is None:
            return False
        patch = {"metadata": {"resourceVersion": version}, "data": {CONFIGMAP_KEY: new.to_json()}}
        response = self._call(
            "PATCH", json=patch, headers={"Content-Type": "application/merge-patch+json"}
        )
        if response.status_code == 409:  # another replica patched it since we read it
            return False
        if response.status_code >= 300:
            raise CheckpointError(f"{self.source}: patch answered HTTP {response.status_code}")
        return True

    def close(self) -> None:
        self._client.close()

    def _get(self) -> tuple[Checkpoint | None, str | None]:
        """The checkpoint (None: none yet) and the resourceVersion (None: no ConfigMap)."""
        response = self._call("GET")
        if response.status_code == 404:
            return None, None
        if response.status_code != 200:
            raise CheckpointError(f"{self.source}: get answered HTTP {response.status_code}")
        try:
            body = response.json()
            version = str(body["metadata"]["resourceVersion"])
            raw = (body.get("data") or {}).get(CONFIGMAP_KEY)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{self.source}: not a ConfigMap") from None
        return (None if raw is None else _parse(raw, self.source)), version

    def _call(self, method: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, self.url, **kwargs)
        except httpx.HTTPError as err:
            raise CheckpointError(f"{self.source}: {type(err).__name__}") from None


@dataclass(frozen=True)
class CheckpointPlaces:
    """Which places to keep the head in; plain data, handed to the writer process."""

    file: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    redis_prefix: str = REDIS_PREFIX
    configmap: str | None = None
    kube_api: str | None = None
    namespace: str = "default"

    @classmethod
    def detect(
        cls, home: Path, redis_url: str | None = None, configmap: str | None = None
    ) -> CheckpointPlaces:
        """The home's file; Redis when given; the ConfigMap `configmap`
        (`DIFY_MIRROR_AUDIT_CONFIGMAP`), through this pod's API server (or
        `DIFY_MIRROR_KUBE_API`)."""
        places = cls(file=str(Path(home) / FILE_NAME), redis_url=redis_url)
        if not configmap:
            return places
        try:
            access = cluster_access()
        except KubernetesUnavailable:
            raise ValueError(
                f"{CONFIGMAP_VARIABLE} is set but no Kubernetes API is known "
                "(not in a pod, and DIFY_MIRROR_KUBE_API is unset)"
            ) from None
        return replace(places, configmap=configmap, kube_api=access.api, namespace=access.namespace)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointPlaces:
        return cls(**data)

    def open(self, chain_id: str) -> list[CheckpointPlace]:
        places: list[CheckpointPlace] = []
        if self.file:
            places.append(FileCheckpoint(Path(self.file)))
        if self.redis_url:
            places.append(RedisCheckpoint(self.redis_url, self.redis_prefix + chain_id))
        if self.configmap and self.kube_api:
            places.append(ConfigMapCheckpoint(self.kube_api, self.namespace, self.configmap))
        return places


def read_all(places: list[CheckpointPlace]) -> tuple[list[Checkpoint], list[str]]:
    """Every checkpoint found, and why each unreadable place could not be read."""
    found: list[Checkpoint] = []
    problems: list[str] = []
    for place in places:
        try:
            point = place.read()
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if point is not None:
            found.append(point)
    return found, problems


def _parse(raw: str | bytes, source: str) -> Checkpoint:
    try:
        return Checkpoint.from_json(raw, source)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
