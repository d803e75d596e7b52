#!/usr/bin/env bash
# make e2e: the whole product on a throwaway kind cluster, then the cluster is deleted.
#   1. a kind cluster (e2e/kind-config.yaml: ports 80/443 for the ingress)
#   2. both images built (operator/Dockerfile, serving/Dockerfile) and loaded into kind
#   3. ingress-nginx, KubeRay (its Helm chart), then this chart with ci/kind-values.yaml
#   4. e2e/test_kind.py: examples/ applied, Ready, inference, upsert + search, an async
#      task, gRPC, /v1/metrics, then the CRs deleted and their apps checked gone
# Where a tool is missing it stops at once with one line naming it (these development
# machines have no Docker engine, so `make test` never runs this).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${DIFY_MIRROR_E2E_CLUSTER:-dify-mirror-e2e}
NAMESPACE=dify-mirror
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}
INGRESS_NGINX=${INGRESS_NGINX:-https://raw.githubusercontent.com/kubernetes/ingress-nginx/controller-v1.13.3/deploy/static/provider/kind/deploy.yaml}
PYTHON=${PYTHON:-.venv/bin/python}

missing=()
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ] && ! docker info >/dev/null 2>&1; then
  missing+=("a running Docker engine (docker info failed)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "make e2e: missing ${missing[*]}; it needs docker with a running engine, kind, kubectl and helm" >&2
  exit 2
fi

cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

kind create cluster --name "$CLUSTER" --config e2e/kind-config.yaml --wait 120s
docker build -f operator/Dockerfile -t dify-mirror-operator:dev .
docker build -f serving/Dockerfile -t dify-mirror-serving:dev .
kind load docker-image --name "$CLUSTER" dify-mirror-operator:dev dify-mirror-serving:dev

kubectl apply -f "$INGRESS_NGINX"
kubectl -n ingress-nginx wait --for=condition=Available deployment/ingress-nginx-controller --timeout=300s
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace kuberay-system --create-namespace --wait

helm upgrade --install dify-mirror charts/dify-mirror --namespace "$NAMESPACE" --create-namespace \
  -f charts/dify-mirror/ci/kind-values.yaml --wait --timeout 15m
helm test dify-mirror --namespace "$NAMESPACE" --timeout 10m

KEY=$(kubectl -n "$NAMESPACE" get secret dify-mirror-secrets -o jsonpath='{.data.bootstrap_key}' | base64 -d)
kubectl -n "$NAMESPACE" port-forward service/dify-mirror-gateway 19000:9000 >/dev/null 2>&1 &
forward=$!
trap 'kill $forward 2>/dev/null || true; cleanup' EXIT
DIFY_MIRROR_E2E=1 \
DIFY_MIRROR_NAMESPACE="$NAMESPACE" \
DIFY_MIRROR_E2E_GATEWAY=http://dify.localtest.me \
DIFY_MIRROR_E2E_GRPC=127.0.0.1:19000 \
DIFY_MIRROR_E2E_KEY="$KEY" \
  "$PYTHON" -m pytest e2e -m e2e -p no:cacheprovider
