{{/*
Names. Release "meshca" gives exactly deploy/'s names (meshca-signer, meshca-approver, ...),
which the drift test relies on; any other release gets <release>-meshca-... unless the release
name already contains "meshca".
*/}}
{{- define "meshca.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshca.signer" -}}
{{- printf "%s-signer" (include "meshca.fullname" .) -}}
{{- end -}}

{{- define "meshca.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshca
{{- end -}}

{{- define "meshca.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: signer
{{- end -}}

{{/* The signer names the signer-name rules cover: meshca.io/<ca> per listed CA, else meshca.io/*. */}}
{{- define "meshca.signerNames" -}}
{{- if .Values.cas -}}
{{- range .Values.cas }}
- {{ printf "meshca.io/%s" . | quote }}
{{- end -}}
{{- else }}
- "meshca.io/*"
{{- end -}}
{{- end -}}

{{- define "meshca.subject" -}}
subjects:
  - kind: ServiceAccount
    name: {{ include "meshca.signer" . }}
    namespace: {{ .Release.Namespace }}
{{- end -}}

{{- define "meshca.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}
