{{/*
Names: every name is truncated to 63 characters (a DNS label), suffixes included.
*/}}
{{- define "dify-mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dify-mirror.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* `<fullname>-<suffix>`, the full name cut so that the whole stays within 63. */}}
{{- define "dify-mirror.suffixed" -}}
{{- $ctx := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $base := include "dify-mirror.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{- define "dify-mirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dify-mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dify-mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object; `(list $ "component")`. */}}
{{- define "dify-mirror.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "dify-mirror.chart" $ctx }}
{{ include "dify-mirror.selectorLabels" $ctx }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: dify-mirror
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector of one component's pods; `(list $ "component")`. */}}
{{- define "dify-mirror.componentSelector" -}}
{{ include "dify-mirror.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* An image reference; `(list $ .image)` or `(list $ .image "suffix")`. */}}
{{- define "dify-mirror.image" -}}
{{- $ctx := index . 0 -}}
{{- $image := index . 1 -}}
{{- $suffix := "" -}}
{{- if gt (len .) 2 -}}{{- $suffix = index . 2 -}}{{- end -}}
{{- $tag := $image.tag | default (printf "%s%s" $ctx.Chart.AppVersion $suffix) -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}

{{- define "dify-mirror.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- .Values.operator.serviceAccount.name | default (include "dify-mirror.suffixed" (list . "operator")) -}}
{{- else -}}
{{- .Values.operator.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "dify-mirror.rayServiceAccount" -}}
{{- if .Values.ray.serviceAccount.create -}}
{{- .Values.ray.serviceAccount.name | default (include "dify-mirror.suffixed" (list . "ray")) -}}
{{- else -}}
{{- .Values.ray.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "dify-mirror.peeringName" -}}
{{- .Values.operator.peering.name | default (include "dify-mirror.fullname" .) -}}
{{- end -}}

{{/* Which workloads run Ray: "kuberay" or "plain". */}}
{{- define "dify-mirror.rayMode" -}}
{{- $mode := .Values.ray.mode -}}
{{- if eq $mode "auto" -}}
{{- ternary "kuberay" "plain" (.Capabilities.APIVersions.Has "ray.io/v1/RayCluster") -}}
{{- else -}}
{{- $mode -}}
{{- end -}}
{{- end -}}

{{/* "true" when a switch (`auto`, true, false) is on; `(list $ value "group/version/Kind")`. */}}
{{- define "dify-mirror.switch" -}}
{{- $ctx := index . 0 -}}
{{- $value := toString (index . 1) -}}
{{- if eq $value "true" -}}
true
{{- else if and (eq $value "auto") ($ctx.Capabilities.APIVersions.Has (index . 2)) -}}
true
{{- end -}}
{{- end -}}

{{/* A number as an environment value: integers without an exponent. */}}
{{- define "dify-mirror.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/*
A generated secret value, kept across upgrades: the value given, else what the live
Secret holds (`lookup`; empty under `helm template`), else `generate`.
`(dict "ctx" $ "secret" name "key" key "value" given "generate" fresh)`.
*/}}
{{- define "dify-mirror.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else -}}
{{- $found := "" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .secret -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- $found = index $live.data .key | b64dec -}}
{{- end -}}
{{- $found | default .generate -}}
{{- end -}}
{{- end -}}

{{/* Secrets and their keys. */}}
{{- define "dify-mirror.secretsName" -}}
{{- .Values.secrets.existingSecret | default (include "dify-mirror.suffixed" (list . "secrets")) -}}
{{- end -}}

{{- define "dify-mirror.rayAuthSecret" -}}
{{- .Values.ray.auth.existingSecret | default (include "dify-mirror.suffixed" (list . "ray-auth")) -}}
{{- end -}}

{{- define "dify-mirror.externalSecret" -}}
{{- include "dify-mirror.suffixed" (list . "external") -}}
{{- end -}}

{{/* The Secret and key of a bundled server's password; `(list $ "redis")`. */}}
{{- define "dify-mirror.passwordRef" -}}
{{- $ctx := index . 0 -}}
{{- $server := index . 1 -}}
{{- $auth := (index $ctx.Values $server).auth -}}
name: {{ $auth.existingSecret | default (include "dify-mirror.suffixed" (list $ctx $server)) }}
key: {{ ternary $auth.existingSecretKey "password" (not (empty $auth.existingSecret)) }}
{{- end -}}

{{/* The Secret and key of an external server's URL; `(list $ "redis" "redis_url")`. */}}
{{- define "dify-mirror.urlRef" -}}
{{- $ctx := index . 0 -}}
{{- $external := (index $ctx.Values (index . 1)).external -}}
name: {{ $external.existingSecret | default (include "dify-mirror.externalSecret" $ctx) }}
key: {{ ternary $external.existingSecretKey (index . 2) (not (empty $external.existingSecret)) }}
{{- end -}}

{{/* The task broker's kind: amqp, redis or embedded. */}}
{{- define "dify-mirror.broker" -}}
{{- $broker := .Values.gateway.tasks.broker -}}
{{- if eq $broker "auto" -}}
{{- if ne .Values.rabbitmq.mode "none" -}}amqp
{{- else if ne .Values.redis.mode "none" -}}redis
{{- else -}}embedded
{{- end -}}
{{- else -}}
{{- $broker -}}
{{- end -}}
{{- end -}}

{{- define "dify-mirror.ns" -}}
{{- .Release.Namespace -}}
{{- end -}}

{{- define "dify-mirror.rayHeadService" -}}
{{- include "dify-mirror.suffixed" (list . "ray-head") -}}
{{- end -}}

{{/* The Qdrant URL the operator and the indexes use; empty when none. */}}
{{- define "dify-mirror.qdrantUrl" -}}
{{- if eq .Values.qdrant.mode "bundled" -}}
{{- printf "http://%s.%s.svc:6333" (include "dify-mirror.suffixed" (list . "qdrant")) .Release.Namespace -}}
{{- else if eq .Values.qdrant.mode "external" -}}
{{- .Values.qdrant.external.url -}}
{{- end -}}
{{- end -}}

{{/* Where users reach the gateway (the status `endpoint` of a model). */}}
{{- define "dify-mirror.gatewayUrl" -}}
{{- if .Values.ingress.enabled -}}
{{- printf "%s://%s" (ternary "https" "http" .Values.ingress.tls.enabled) (first .Values.ingress.hosts) -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "dify-mirror.suffixed" (list . "gateway")) .Release.Namespace (int .Values.gateway.service.httpPort) -}}
{{- end -}}
{{- end -}}

{{/* Settings no value combination may break: each fails the render with one line. */}}
{{- define "dify-mirror.validate" -}}
{{- $broker := include "dify-mirror.broker" . -}}
{{- if and (eq $broker "redis") (eq .Values.redis.mode "none") -}}
{{- fail "gateway.tasks.broker is redis but redis.mode is none" -}}
{{- end -}}
{{- if and (eq $broker "amqp") (eq .Values.rabbitmq.mode "none") -}}
{{- fail "gateway.tasks.broker is amqp but rabbitmq.mode is none" -}}
{{- end -}}
{{- if and (gt (int .Values.gateway.replicas) 1) .Values.gateway.auth (eq .Values.redis.mode "none") (not .Values.gateway.allowPerReplicaLimits) -}}
{{- fail "gateway.replicas > 1 needs Redis (redis.mode bundled or external) or gateway.allowPerReplicaLimits: true" -}}
{{- end -}}
{{- range $server := list "postgresql" "redis" "rabbitmq" -}}
{{- $values := index $.Values $server -}}
{{- if and (eq $values.mode "external") (not $values.external.url) (not $values.external.existingSecret) -}}
{{- fail (printf "%s.mode is external: set %s.external.url or %s.external.existingSecret" $server $server $server) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.qdrant.mode "external") (not .Values.qdrant.external.url) -}}
{{- fail "qdrant.mode is external: set qdrant.external.url" -}}
{{- end -}}
{{- if and .Values.ingress.enabled .Values.ingress.tls.enabled (not .Values.ingress.tls.secretName) -}}
{{- fail "ingress.tls.enabled: set ingress.tls.secretName" -}}
{{- end -}}
{{- range $name, $group := .Values.ray.workerGroups -}}
{{- if and $group.enabled (or (gt (int $group.minReplicas) (int $group.replicas)) (gt (int $group.replicas) (int $group.maxReplicas))) -}}
{{- fail (printf "ray.workerGroups.%s: minReplicas <= replicas <= maxReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.peering.enabled) -}}
{{- fail "operator.replicas > 1 needs operator.peering.enabled (else every replica acts)" -}}
{{- end -}}
{{- end -}}
