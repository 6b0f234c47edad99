{{/*
Names, labels and the few derived values every template shares. Checks of values that the schema
cannot express (they depend on each other) live in densemesh.validate, which every render runs.
*/}}

{{- define "densemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name alone when it already contains the chart name. */}}
{{- define "densemesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "densemesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that select a component's pods: stable for the release's life. */}}
{{- define "densemesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "densemesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every resource's labels: the selector labels plus version and management. */}}
{{- define "densemesh.labels" -}}
{{ include "densemesh.selectorLabels" . }}
helm.sh/chart: {{ include "densemesh.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: densemesh
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "densemesh.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "densemesh.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Empty: meshd pods run as their namespace's default ServiceAccount (runtimes may live anywhere). */}}
{{- define "densemesh.meshd.serviceAccountName" -}}
{{- if .Values.meshd.serviceAccount.create }}
{{- default (printf "%s-meshd" (include "densemesh.fullname" .)) .Values.meshd.serviceAccount.name }}
{{- else }}
{{- .Values.meshd.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "densemesh.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The meshd Service: what clients, the controller and InferenceService status point at. */}}
{{- define "densemesh.meshd.serviceHost" -}}
{{- printf "%s-meshd.%s" (include "densemesh.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "densemesh.etcd.fullname" -}}
{{- printf "%s-etcd" (include "densemesh.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* etcd client URLs, comma-separated, as meshd's DENSEMESH_ETCD takes them. */}}
{{- define "densemesh.etcd.endpoints" -}}
{{- if eq .Values.etcd.mode "external" }}
{{- join "," .Values.etcd.external.endpoints }}
{{- else }}
{{- printf "http://%s.%s.svc:2379" (include "densemesh.etcd.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "densemesh.etcd.tlsSecret" -}}
{{- if eq .Values.etcd.mode "external" }}{{ .Values.etcd.external.tls.secretName }}{{ end }}
{{- end }}

{{/*
Checks that span several values, with messages that name the value to change. The schema already
checks each value's type and form (etcd.mode's choices, capacity's syntax).
*/}}
{{- define "densemesh.validate" -}}
{{- if and (eq .Values.etcd.mode "external") (empty .Values.etcd.external.endpoints) }}
{{- fail "etcd.mode is external but etcd.external.endpoints is empty: list your etcd client URLs, or set etcd.mode=bundled" }}
{{- end }}
{{- if and (ne .Values.etcd.mode "external") .Values.etcd.external.tls.secretName }}
{{- fail "etcd.external.tls.secretName is set but etcd.mode is not external: the bundled etcd serves plain HTTP inside the release" }}
{{- end }}
{{- if hasSuffix "%" (toString .Values.meshd.capacity) }}
{{- $limits := (.Values.meshd.resources | default dict).limits | default dict }}
{{- if not $limits.memory }}
{{- fail (printf "meshd.capacity %s is a share of the container's memory limit, but meshd.resources.limits.memory is not set (without a limit meshd takes a share of the whole node's memory): set one, or give meshd.capacity as a size such as 2GiB" (toString .Values.meshd.capacity)) }}
{{- end }}
{{- if .Values.defaultRuntime.enabled }}
{{- $rlimits := (.Values.defaultRuntime.resources | default dict).limits | default dict }}
{{- if and .Values.defaultRuntime.resources (not $rlimits.memory) }}
{{- fail (printf "meshd.capacity %s is a share of the container's memory limit, but defaultRuntime.resources has no limits.memory (its pods would take a share of the whole node's memory)" (toString .Values.meshd.capacity)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
