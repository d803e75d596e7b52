"""The operator scenario against a real cluster (kind). Needs a cluster; skipped without.

Prerequisites (the packaging issue's `make e2e` sets them up): the CRDs applied, a Ray
cluster with the dashboard reachable by the operator, `python -m dify_operator` (or the
chart) running, the gateway reachable at DIFY_MIRROR_E2E_GATEWAY, and an API key with the
inference scope in DIFY_MIRROR_E2E_KEY.

    DIFY_MIRROR_E2E=1 DIFY_MIRROR_E2E_GATEWAY=http://127.0.0.1:8000 DIFY_MIRROR_E2E_KEY=dm_... \
        pytest e2e -m e2e
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("DIFY_MIRROR_E2E") != "1",
        reason="needs a Kubernetes cluster (kind): set DIFY_MIRROR_E2E=1",
    ),
]

GROUP, VERSION, PLURAL = "difymirror.dev", "v1alpha1", "difymodels"
NAMESPACE = os.environ.get("DIFY_MIRROR_NAMESPACE", "default")


def test_model_lifecycle_on_a_cluster() -> None:
    from kubernetes import client, config

    config.load_kube_config()
    api = client.CustomObjectsApi()
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DifyModel",
        "metadata": {"name": "e2e-demo"},
        "spec": {"modelId": "builtin:demo-llm", "resources": {"cpus": 0.5}},
    }
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
    try:
        deadline = time.monotonic() + 600
        while True:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "e2e-demo")
            if obj.get("status", {}).get("phase") == "Ready":
                break
            assert time.monotonic() < deadline, obj.get("status")
            time.sleep(2)
        gateway = os.environ["DIFY_MIRROR_E2E_GATEWAY"]
        r = httpx.post(
            f"{gateway}/v1/inference",
            timeout=60,
            json={"model": "e2e-demo", "prompt": "hi", "max_tokens": 4},
            # the key the cluster's gateway was bootstrapped with
            headers={"Authorization": f"Bearer {os.environ['DIFY_MIRROR_E2E_KEY']}"},
        )
        assert r.status_code == 200, r.text
    finally:
        api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "e2e-demo")
    deadline = time.monotonic() + 120
    while True:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "e2e-demo")
        except client.ApiException as exc:
            assert exc.status == 404
            break
        assert time.monotonic() < deadline, "finalizer never released"
        time.sleep(1)
