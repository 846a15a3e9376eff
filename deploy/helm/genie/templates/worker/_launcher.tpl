{{/* The train worker's identity for launching training Jobs (worker.kubernetes.enabled; see rbac.yaml). */}}

{{- define "genie.launcherName" -}}
{{- include "genie.componentName" (dict "ctx" . "component" "train-launcher") }}
{{- end }}

{{- define "genie.launcherServiceAccount" -}}
{{- default (include "genie.launcherName" .) .Values.worker.kubernetes.serviceAccount.name }}
{{- end }}
