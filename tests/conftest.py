"""The session's environment, shared by every test group.

The tests are grouped by what they need, one folder each, and each folder's conftest
marks its tests with the folder's name (`pytest -m unit`, `make test-unit`):

- `unit/`: no Redis, no PostgreSQL, no Ray; runs in well under a minute.
- `services/`: Redis and PostgreSQL on their local ports (skipped when down, failed
  under `CI=true`).
- `stack/`: one real local stack (Ray, Serve, gateway, tiny models) for the session.
- `operator/`: the kopf operator against the emulated Kubernetes API (`kube_emulator.py`).

Modules here that are not tests are helpers any group imports by name (`support`,
`gateways`, `audit_chain`, `tiny_models`, `kube_emulator`): test files are imported with
`--import-mode=importlib`, which puts nothing on `sys.path`, so this folder is put there
once. Fixtures live in the conftest of the group that uses them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session stack keeps Ray Serve's own 4 MiB limit between deployments (the local
# stack raises it to 64 MiB), so the tests reach the gateway's 413 for what would not fit.
os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(4 * 1024 * 1024))
# No stack binds the default gRPC port 9000 (the port is shared by SO_REUSEPORT, so two
# stacks on it would split each other's calls); a test that wants gRPC picks a free port.
os.environ.setdefault("DIFY_MIRROR_GRPC_PORT", "0")
# The admin key every stack and gateway the tests start is bootstrapped with (Ray workers
# and subprocesses inherit the environment); `support.API_KEY` reads it back.
os.environ.setdefault(
    "DIFY_MIRROR_BOOTSTRAP_KEY", "dm_testadmin001_T3stS3cretT3stS3cretT3stS3cretAB"
)
