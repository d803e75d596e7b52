"""The desired state on one machine: a JSON file under `DIFY_MIRROR_HOME`.

The CLI, the local stack and `LocalCatalog` share it.

It plays the role the Kubernetes API plays in a cluster. The CLI seeds it from a
manifests file; `POST /v1/models/load` and `/unload` change it; every change is followed
by a render + apply of the whole state. Writes take an exclusive `flock` and replace the
file atomically, so the CLI and several gateway replicas can share it; readers re-read
only when the file's mtime changes.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dify_serving.manifests import DesiredState, parse_documents
from dify_serving.options import ServeOptions


class LocalStateStore:
    FILENAME = "desired-state.json"

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.path = self.home / self.FILENAME
        self._cache: tuple[int, DesiredState, ServeOptions] | None = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".desired-state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> tuple[DesiredState, ServeOptions]:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return DesiredState(), ServeOptions()
        if self._cache and self._cache[0] == stamp:
            return self._cache[1], self._cache[2]
        raw: dict[str, Any] = json.loads(self.path.read_text())
        state = parse_documents(raw.get("objects", []), source=str(self.path))
        options = ServeOptions.model_validate(raw.get("serve", {}))
        self._cache = (stamp, state, options)
        return state, options

    def load(self) -> tuple[DesiredState, ServeOptions]:
        """The current desired state and serve options (cached until the file changes)."""
        return self._read()

    def save(self, state: DesiredState, options: ServeOptions) -> None:
        with self._locked():
            self._write(state, options)

    def update(
        self, change: Callable[[DesiredState, ServeOptions], None]
    ) -> tuple[DesiredState, ServeOptions]:
        """Read-modify-write under the lock; `change` mutates the state in place."""
        with self._locked():
            self._cache = None
            state, options = self._read()
            state = DesiredState(dict(state.models), dict(state.indexes))
            change(state, options)
            self._write(state, options)
            return state, options

    def _write(self, state: DesiredState, options: ServeOptions) -> None:
        body = {"serve": options.model_dump(mode="json"), "objects": state.documents()}
        scratch = self.path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(body, indent=2, sort_keys=True))
        os.replace(scratch, self.path)
        self._cache = None
