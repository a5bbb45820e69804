{{/*
Names. The fullname is the release name when it already contains the chart's
name (`helm install ims-token-refresher ...`), else "<release>-<chart>"; cut
to 63 characters, the limit of a DNS label (Service names, label values).
*/}}
{{- define "itr.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "itr.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A name for one component: "<fullname>-<suffix>", kept under 63 characters. */}}
{{- define "itr.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "itr.fullname" $root | trunc (int (sub 62 (len $suffix)))) $suffix | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries; `component` names the part of the chart. */}}
{{- define "itr.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{ include "itr.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: ims-token-refresher
{{- end -}}

{{/* The labels a component's selector matches: stable across upgrades. */}}
{{- define "itr.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "itr.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
The refresher image: a digest wins over a tag; the tag defaults to the
chart's appVersion, so chart and image are released together.
*/}}
{{- define "itr.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The pod-level security context of every pod the chart runs. */}}
{{- define "itr.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The container-level security context: the `restricted` Pod Security Standard and more. */}}
{{- define "itr.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Scheduling settings shared by the chart's Deployments (argument: the component's values). */}}
{{- define "itr.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The injector's TLS Secret, written by the chart or by cert-manager. */}}
{{- define "itr.injector.tlsSecretName" -}}
{{- include "itr.componentName" (list . "injector-tls") -}}
{{- end -}}

{{- define "itr.injector.serviceName" -}}
{{- include "itr.componentName" (list . "injector") -}}
{{- end -}}
