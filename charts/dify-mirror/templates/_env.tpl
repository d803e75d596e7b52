{{/*
Environment of the operator: every gateway setting as the DIFY_MIRROR_* variable the
operator's settings (dify_operator.settings.OperatorSettings) read, so the gateway it
renders gets them as options. No secret is here except the Ray token, by reference: the
operator only learns *that* a database, Redis or broker is configured.
*/}}
{{- define "dify-mirror.operatorEnv" -}}
{{- $g := .Values.gateway -}}
{{- $num := "dify-mirror.number" -}}
- name: DIFY_MIRROR_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: DIFY_MIRROR_CLUSTER_WIDE
  value: {{ .Values.operator.clusterWide | quote }}
- name: DIFY_MIRROR_PEERING
  value: {{ ternary (include "dify-mirror.peeringName" .) "" .Values.operator.peering.enabled | quote }}
- name: DIFY_MIRROR_LIVENESS_PORT
  value: {{ .Values.operator.healthPort | int | quote }}
- name: DIFY_MIRROR_HOME
  value: /tmp/dify-mirror
- name: DIFY_MIRROR_RAY_DASHBOARD
  value: {{ printf "http://%s.%s.svc:8265" (include "dify-mirror.rayHeadService" .) .Release.Namespace | quote }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "dify-mirror.rayAuthSecret" . }}
      key: auth_token
- name: DIFY_MIRROR_GATEWAY_URL
  value: {{ include "dify-mirror.gatewayUrl" . | quote }}
- name: DIFY_MIRROR_HOST
  value: 0.0.0.0
- name: DIFY_MIRROR_PORT
  value: "8000"
- name: DIFY_MIRROR_GRPC_PORT
  value: "9000"
- name: DIFY_MIRROR_GATEWAY_REPLICAS
  value: {{ $g.replicas | int | quote }}
- name: DIFY_MIRROR_MODULES
  value: {{ join "," $g.modules | quote }}
{{- if $g.defaultModel }}
- name: DIFY_MIRROR_DEFAULT_MODEL
  value: {{ $g.defaultModel | quote }}
{{- end }}
- name: DIFY_MIRROR_REQUEST_TIMEOUT_S
  value: {{ include $num $g.requestTimeoutS | quote }}
- name: DIFY_MIRROR_METRICS_ENABLED
  value: {{ $g.metricsEnabled | quote }}
- name: DIFY_MIRROR_METRICS_PUBLIC
  value: {{ $g.metricsPublic | quote }}
- name: DIFY_MIRROR_AUTH
  value: {{ $g.auth | quote }}
- name: DIFY_MIRROR_TRUSTED_PROXIES
  value: {{ join "," $g.trustedProxies | quote }}
- name: DIFY_MIRROR_IP_ALLOWLIST
  value: {{ join "," $g.ipAllowlist | quote }}
{{- $routes := list }}
{{- range $route, $rate := $g.routeLimits }}
{{- $routes = append $routes (printf "%s=%s" $route (include $num $rate)) }}
{{- end }}
- name: DIFY_MIRROR_ROUTE_LIMITS
  value: {{ join "," $routes | quote }}
- name: DIFY_MIRROR_RATE_LIMIT_FAIL_OPEN
  value: {{ $g.rateLimitFailOpen | quote }}
- name: DIFY_MIRROR_ALLOW_PER_REPLICA_LIMITS
  value: {{ $g.allowPerReplicaLimits | quote }}
- name: DIFY_MIRROR_REQUIRE_TOTP_FOR_ADMIN
  value: {{ $g.requireTotpForAdmin | quote }}
- name: DIFY_MIRROR_MAX_BODY_BYTES
  value: {{ $g.limits.maxBodyBytes | int64 | quote }}
- name: DIFY_MIRROR_MAX_DOCUMENT_BYTES
  value: {{ $g.limits.maxDocumentBytes | int64 | quote }}
- name: DIFY_MIRROR_MAX_DOCUMENTS
  value: {{ $g.limits.maxDocuments | int64 | quote }}
- name: DIFY_MIRROR_STREAM_IDLE_TIMEOUT_S
  value: {{ include $num $g.limits.streamIdleTimeoutS | quote }}
- name: DIFY_MIRROR_MAX_BATCH_REQUESTS
  value: {{ $g.limits.maxBatchRequests | int64 | quote }}
- name: DIFY_MIRROR_CACHE_TTL
  value: {{ include $num $g.cache.ttlS | quote }}
- name: DIFY_MIRROR_CACHE_MAX_BYTES
  value: {{ $g.cache.maxBytes | int64 | quote }}
- name: DIFY_MIRROR_BROKER
  value: {{ include "dify-mirror.broker" . | quote }}
- name: DIFY_MIRROR_TASK_TTL
  value: {{ include $num $g.tasks.ttlS | quote }}
- name: DIFY_MIRROR_TASK_MAX_ATTEMPTS
  value: {{ $g.tasks.maxAttempts | int64 | quote }}
- name: DIFY_MIRROR_TASK_LEASE_S
  value: {{ include $num $g.tasks.leaseS | quote }}
- name: DIFY_MIRROR_TASK_CONSUMERS
  value: {{ $g.tasks.consumers | int64 | quote }}
- name: DIFY_MIRROR_TASK_CONCURRENCY
  value: {{ $g.tasks.concurrency | int64 | quote }}
- name: DIFY_MIRROR_TASK_MAX_PENDING_PER_KEY
  value: {{ $g.tasks.maxPendingPerKey | int64 | quote }}
- name: DIFY_MIRROR_WEBHOOK_ALLOW_PRIVATE
  value: {{ $g.tasks.webhookAllowPrivate | quote }}
- name: DIFY_MIRROR_HUB_DOWNLOADS
  value: {{ $g.sources.hubDownloads | quote }}
- name: DIFY_MIRROR_MODEL_ROOTS
  value: {{ join "," $g.sources.roots | quote }}
- name: DIFY_MIRROR_AUDIT_RECORD_TEXT
  value: {{ $g.audit.recordText | quote }}
- name: DIFY_MIRROR_AUDIT_RETENTION_DAYS
  value: {{ $g.audit.retentionDays | int64 | quote }}
- name: DIFY_MIRROR_AUDIT_ALLOW_SHORT_RETENTION
  value: {{ $g.audit.allowShortRetention | quote }}
- name: DIFY_MIRROR_AUDIT_CHECKPOINT_S
  value: {{ include $num $g.audit.checkpointS | quote }}
{{- if $g.audit.checkpointConfigMap }}
- name: DIFY_MIRROR_AUDIT_CONFIGMAP
  value: {{ include "dify-mirror.suffixed" (list . "audit-checkpoint") | quote }}
{{- end }}
{{- with include "dify-mirror.qdrantUrl" . }}
- name: DIFY_MIRROR_QDRANT_URL
  value: {{ . | quote }}
{{- end }}
- name: DIFY_MIRROR_DATABASE
  value: {{ ne .Values.postgresql.mode "none" | quote }}
- name: DIFY_MIRROR_REDIS
  value: {{ ne .Values.redis.mode "none" | quote }}
{{- with $g.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .Values.operator.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Environment of every Ray container: the Ray token, and the secrets the gateway, task
consumers and `dify-mirror keys|audit` read where they run (security/secrets.py). A
bundled server's URL is composed by Kubernetes from its password variable ($(VAR)), so
the password lives in one Secret only.
*/}}
{{- define "dify-mirror.rayEnv" -}}
{{- $ns := .Release.Namespace -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "dify-mirror.rayAuthSecret" . }}
      key: auth_token
- name: DIFY_MIRROR_HOME
  value: /tmp/dify-mirror
- name: DIFY_MIRROR_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if .Values.gateway.audit.checkpointConfigMap }}
- name: DIFY_MIRROR_AUDIT_CONFIGMAP
  value: {{ include "dify-mirror.suffixed" (list . "audit-checkpoint") | quote }}
{{- end }}
- name: DIFY_MIRROR_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ include "dify-mirror.secretsName" . }}
      key: key_pepper
- name: DIFY_MIRROR_BOOTSTRAP_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "dify-mirror.secretsName" . }}
      key: bootstrap_key
- name: DIFY_MIRROR_AUDIT_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "dify-mirror.secretsName" . }}
      key: audit_key
      optional: true
- name: DIFY_MIRROR_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "dify-mirror.secretsName" . }}
      key: webhook_secret
      optional: true
{{- if eq .Values.postgresql.mode "bundled" }}
- name: DM_POSTGRESQL_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- include "dify-mirror.passwordRef" (list . "postgresql") | nindent 6 }}
- name: DIFY_MIRROR_DATABASE_URL
  value: {{ printf "postgresql://%s:$(DM_POSTGRESQL_PASSWORD)@%s.%s.svc:5432/%s" .Values.postgresql.auth.username (include "dify-mirror.suffixed" (list . "postgresql")) $ns .Values.postgresql.auth.database | quote }}
{{- else if eq .Values.postgresql.mode "external" }}
- name: DIFY_MIRROR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- include "dify-mirror.urlRef" (list . "postgresql" "database_url") | nindent 6 }}
{{- end }}
{{- $redisHost := printf "%s.%s.svc:6379" (include "dify-mirror.suffixed" (list . "redis")) $ns }}
{{- if eq .Values.redis.mode "bundled" }}
- name: DM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- include "dify-mirror.passwordRef" (list . "redis") | nindent 6 }}
- name: DIFY_MIRROR_REDIS_URL
  value: {{ printf "redis://:$(DM_REDIS_PASSWORD)@%s/0" $redisHost | quote }}
{{- else if eq .Values.redis.mode "external" }}
- name: DIFY_MIRROR_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "dify-mirror.urlRef" (list . "redis" "redis_url") | nindent 6 }}
{{- end }}
{{- $broker := include "dify-mirror.broker" . }}
{{- if and (eq $broker "redis") (eq .Values.redis.mode "bundled") }}
- name: DIFY_MIRROR_BROKER_URL
  value: {{ printf "redis://:$(DM_REDIS_PASSWORD)@%s/1" $redisHost | quote }}
{{- else if eq $broker "redis" }}
- name: DIFY_MIRROR_BROKER_URL
  valueFrom:
    secretKeyRef:
      {{- if and .Values.redis.external.brokerUrl (not .Values.redis.external.existingSecret) }}
      name: {{ include "dify-mirror.externalSecret" . }}
      key: redis_broker_url
      {{- else }}
      {{- include "dify-mirror.urlRef" (list . "redis" "redis_url") | nindent 6 }}
      {{- end }}
{{- else if and (eq $broker "amqp") (eq .Values.rabbitmq.mode "bundled") }}
- name: DM_RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- include "dify-mirror.passwordRef" (list . "rabbitmq") | nindent 6 }}
- name: DIFY_MIRROR_BROKER_URL
  value: {{ printf "amqp://%s:$(DM_RABBITMQ_PASSWORD)@%s.%s.svc:5672//" .Values.rabbitmq.auth.username (include "dify-mirror.suffixed" (list . "rabbitmq")) $ns | quote }}
{{- else if eq $broker "amqp" }}
- name: DIFY_MIRROR_BROKER_URL
  valueFrom:
    secretKeyRef:
      {{- include "dify-mirror.urlRef" (list . "rabbitmq" "broker_url") | nindent 6 }}
{{- end }}
{{- with .Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
