{{/*
Names and labels.

Every named template here and in _sidecar.tpl takes a context with .Values (this chart's
values) and .Release: the chart's own root context, or, from an application chart that
has this chart as a dependency, (dict "Values" .Values.llmSidecar "Release" .Release).
They never use .Chart, .Files or .Capabilities, so both contexts give the same names.
*/}}

{{/* The image tag used when image.tag is empty: this chart's appVersion (a test keeps them equal). */}}
{{- define "llm-sidecar.appVersion" -}}
0.1.0
{{- end }}

{{- define "llm-sidecar.name" -}}
{{- default "llm-sidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-llm-sidecar, or the release name alone when it already contains the name. */}}
{{- define "llm-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "llm-sidecar.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of the objects this chart renders (the chart's own context only). */}}
{{- define "llm-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default (include "llm-sidecar.appVersion" .) | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The label every pod carrying this sidecar has; the metrics Service and the PodMonitor select on it. */}}
{{- define "llm-sidecar.instanceLabel" -}}
llm-sidecar/instance: {{ include "llm-sidecar.fullname" . }}
{{- end }}

{{- define "llm-sidecar.configMapName" -}}
{{- .Values.existingConfigMap | default (include "llm-sidecar.fullname" .) }}
{{- end }}

{{/* The Secret whose keys become the sidecar's environment; empty when there is none. */}}
{{- define "llm-sidecar.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if .Values.secret.create }}
{{- include "llm-sidecar.fullname" . }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "llm-sidecar.fullname" .)) }}
{{- end }}

{{- define "llm-sidecar.image" -}}
{{- $tag := .Values.image.tag | default (include "llm-sidecar.appVersion" .) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}
