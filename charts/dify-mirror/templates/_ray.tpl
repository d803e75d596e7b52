{{/* Pieces of the Ray pods shared by the RayCluster and the plain workloads. */}}

{{/* The worker groups that run: name → group, sorted by name. */}}
{{- define "dify-mirror.workerGroups" -}}
{{- $groups := dict -}}
{{- range $name, $group := .Values.ray.workerGroups -}}
{{- if $group.enabled -}}
{{- $_ := set $groups $name $group -}}
{{- end -}}
{{- end -}}
{{- toJson $groups -}}
{{- end -}}

{{/* A worker group's image; `(list $ group)`. */}}
{{- define "dify-mirror.groupImage" -}}
{{- $ctx := index . 0 -}}
{{- $group := index . 1 -}}
{{- $image := merge (dict) ($group.image | default dict) (dict "repository" $ctx.Values.ray.image.repository) -}}
{{- $suffix := ternary $ctx.Values.ray.image.cudaTagSuffix "" (gt (float64 $group.gpus) 0.0) -}}
{{- include "dify-mirror.image" (list $ctx $image $suffix) -}}
{{- end -}}

{{/* A worker group's resources, with its GPUs; `(list $ group)`. */}}
{{- define "dify-mirror.groupResources" -}}
{{- $group := index . 1 -}}
{{- $resources := deepCopy ($group.resources | default dict) -}}
{{- if gt (float64 $group.gpus) 0.0 -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $group.gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- $requests := $resources.requests | default dict -}}
{{- $_ := set $requests "nvidia.com/gpu" (int $group.gpus) -}}
{{- $_ := set $resources "requests" $requests -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Ports of the head container: Ray's, Serve's HTTP (the gateway) and gRPC. */}}
{{- define "dify-mirror.headPorts" -}}
- name: gcs-server
  containerPort: 6379
- name: dashboard
  containerPort: 8265
- name: client
  containerPort: 10001
- name: serve
  containerPort: 8000
- name: grpc
  containerPort: 9000
- name: metrics
  containerPort: 8080
{{- end -}}

{{/* The parts of a Ray container beyond name, image, command and resources. */}}
{{- define "dify-mirror.rayContainer" -}}
imagePullPolicy: {{ .Values.ray.image.pullPolicy }}
env:
  {{- include "dify-mirror.rayEnv" . | nindent 2 }}
securityContext:
  {{- toYaml .Values.ray.securityContext | nindent 2 }}
volumeMounts:
  - name: shm
    mountPath: /dev/shm
{{- end -}}

{{/* The pod-level parts of a Ray pod; `(list $ nodeSelector tolerations affinity)`. */}}
{{- define "dify-mirror.rayPod" -}}
{{- $ctx := index . 0 -}}
serviceAccountName: {{ include "dify-mirror.rayServiceAccount" $ctx }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $ctx.Values.ray.podSecurityContext | nindent 2 }}
volumes:
  # Ray's object store lives in shared memory
  - name: shm
    emptyDir:
      medium: Memory
{{- with index . 1 }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with index . 2 }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with index . 3 }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* `ray start` parameters as KubeRay wants them: a map of strings. */}}
{{- define "dify-mirror.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}
