{{/* Pieces of the bundled servers' StatefulSets. */}}

{{/* A server's password Secret unless an existing one is named; `(list $ "redis")`. */}}
{{- define "dify-mirror.serverSecret" -}}
{{- $ctx := index . 0 -}}
{{- $server := index . 1 -}}
{{- $auth := (index $ctx.Values $server).auth -}}
{{- if not $auth.existingSecret -}}
{{- $name := include "dify-mirror.suffixed" (list $ctx $server) -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "dify-mirror.labels" (list $ctx $server) | nindent 4 }}
  {{- if $ctx.Values.secrets.keepOnUninstall }}
  annotations:
    # its data volume outlives the release: a new password would lock the data out
    helm.sh/resource-policy: keep
  {{- end }}
type: Opaque
data:
  password: {{ include "dify-mirror.secretValue" (dict "ctx" $ctx "secret" $name "key" "password" "value" $auth.password "generate" (randAlphaNum 32)) | b64enc | quote }}
---
{{ end -}}
{{- end -}}

{{/* A server's Service; `(list $ "redis" (list (dict "name" .. "port" ..)))`. */}}
{{- define "dify-mirror.serverService" -}}
{{- $ctx := index . 0 -}}
{{- $server := index . 1 -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "dify-mirror.suffixed" (list $ctx $server) }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "dify-mirror.labels" (list $ctx $server) | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "dify-mirror.componentSelector" (list $ctx $server) | nindent 4 }}
  ports:
    {{- range index . 2 }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
    {{- end }}
{{- end -}}

{{/* Pod-level parts of a server pod; `(list $ "redis" uid)`. */}}
{{- define "dify-mirror.serverPod" -}}
{{- $ctx := index . 0 -}}
{{- $values := index $ctx.Values (index . 1) -}}
{{- $uid := index . 2 -}}
automountServiceAccountToken: false
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ $uid }}
  runAsGroup: {{ $uid }}
  fsGroup: {{ $uid }}
  seccompProfile:
    type: RuntimeDefault
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The claim of a server's data volume; `(list $ "redis")`. */}}
{{- define "dify-mirror.serverClaim" -}}
{{- $persistence := (index (index . 0).Values (index . 1)).persistence -}}
volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: [ReadWriteOnce]
      {{- with $persistence.storageClass }}
      storageClassName: {{ . }}
      {{- end }}
      resources:
        requests:
          storage: {{ $persistence.size }}
{{- end -}}

{{/* A server container's security context; `(list $ readOnlyRootFilesystem)`. */}}
{{- define "dify-mirror.serverSecurity" -}}
{{- $ctx := index . 0 -}}
{{- toYaml (merge (deepCopy $ctx.Values.servers.securityContext) (dict "readOnlyRootFilesystem" (index . 1))) -}}
{{- end -}}
