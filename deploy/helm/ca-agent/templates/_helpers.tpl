{{- define "ca-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ca-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "ca-agent.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ca-agent.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ca-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ca-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ca-agent.labels" -}}
{{ include "ca-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ca-agent.serviceAccountName" -}}
{{- default (include "ca-agent.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "ca-agent.caRootConfigMap" -}}
{{- if .Values.caRoot.configMap -}}{{ .Values.caRoot.configMap }}{{- else -}}{{ include "ca-agent.fullname" . }}-ca-root{{- end -}}
{{- end -}}

{{- define "ca-agent.subject" -}}
- kind: ServiceAccount
  name: {{ include "ca-agent.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}
