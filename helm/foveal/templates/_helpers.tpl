{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "foveal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: fullnameOverride, else <release>-<name> (just <release>
when it already contains the name). Short enough for the longest suffix (-router-grpc). */}}
{{- define "foveal.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "foveal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "foveal.labels" -}}
helm.sh/chart: {{ include "foveal.chart" . }}
app.kubernetes.io/name: {{ include "foveal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: foveal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "router"). */}}
{{- define "foveal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "foveal.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects. */}}
{{- define "foveal.componentLabels" -}}
{{ include "foveal.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "foveal.routerName" -}}
{{- printf "%s-router" (include "foveal.fullname" .) }}
{{- end }}

{{- define "foveal.routerGrpcName" -}}
{{- printf "%s-router-grpc" (include "foveal.fullname" .) }}
{{- end }}

{{- define "foveal.operatorName" -}}
{{- printf "%s-operator" (include "foveal.fullname" .) }}
{{- end }}

{{- define "foveal.configName" -}}
{{- printf "%s-config" (include "foveal.fullname" .) }}
{{- end }}

{{- define "foveal.routerServiceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "foveal.routerName" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- required "router.serviceAccount.name is required when router.serviceAccount.create is false" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "foveal.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "foveal.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "foveal.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The router's /metrics URL inside the cluster, which the operator reads demand from. */}}
{{- define "foveal.routerMetricsUrl" -}}
{{- printf "http://%s.%s.svc:%d/metrics" (include "foveal.routerName" .) .Release.Namespace (int .Values.router.service.httpPort) }}
{{- end }}

{{/* One pool's values: poolDefaults overridden key by key by the pool's own entry.
Include with (dict "ctx" $ "pool" $pool); returns YAML (use fromYaml). */}}
{{- define "foveal.poolValues" -}}
{{- $pool := deepCopy .pool }}
{{- $merged := mergeOverwrite (deepCopy .ctx.Values.poolDefaults) $pool }}
{{- toYaml $merged }}
{{- end }}
