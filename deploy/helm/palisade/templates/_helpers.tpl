{{/* The Service name is fixed: it is the name in the serving certificate's SANs. */}}
{{- define "palisade.fullname" -}}palisade-injector{{- end -}}

{{- define "palisade.selectorLabels" -}}
app.kubernetes.io/name: palisade-injector
{{- end -}}

{{- define "palisade.labels" -}}
{{ include "palisade.selectorLabels" . }}
app.kubernetes.io/part-of: palisade
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "palisade.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* Namespaces the mutating webhook never selects. */}}
{{- define "palisade.systemNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace -}}
{{- range .Values.config.ignoredNamespaces }}{{- $ns = append $ns . -}}{{- end -}}
{{- toJson (uniq $ns | sortAlpha) -}}
{{- end -}}
