{{- define "ca-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ca-server.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "ca-server.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ca-server.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ca-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ca-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ca-server.labels" -}}
{{ include "ca-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ca-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ca-server.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ca-server.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ca-server.postgres" -}}
{{- if or (hasPrefix "postgres://" .Values.database.url) (hasPrefix "postgresql://" .Values.database.url) -}}true{{- end -}}
{{- end -}}

{{/* The restricted Pod Security profile, for every pod and container of the chart. */}}
{{- define "ca-server.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ca-server.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A key reference: pkcs11 (module and PIN file from .Values.hsm) or a file in fileKeysSecret. */}}
{{- define "ca-server.keyRef" -}}
{{- $key := .key -}}
{{- $v := .root.Values -}}
{{- if $key.pkcs11 -}}
{{- if not $v.hsm.enabled -}}{{- fail (printf "%s: a pkcs11 key needs hsm.enabled" .where) -}}{{- end -}}
{{- printf "pkcs11:token=%s;object=%s?module-path=%s&pin-source=file:/etc/ca-server/hsm-pin/%s" $key.pkcs11.token $key.pkcs11.object $v.hsm.module $v.hsm.pinSecret.key -}}
{{- else if $key.file -}}
{{- if not $v.fileKeysSecret -}}{{- fail (printf "%s: a file key needs fileKeysSecret" .where) -}}{{- end -}}
{{- printf "file:/etc/ca-server/keys/%s" $key.file -}}
{{- else -}}
{{- fail (printf "%s: give key.pkcs11 or key.file" .where) -}}
{{- end -}}
{{- end -}}
