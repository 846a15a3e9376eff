{{/* The train worker's identity for launching training Jobs (worker.kubernetes.enabled; see rbac.yaml). */}}

{{- define "genie.launcherName" -}}
{{- include "genie.componentName" (dict "ctx" . "component" "train-launcher") }}
{{- end }}

{{- define "genie.launcherServiceAccount" -}}
{{- default (include "genie.launcherName" .) .Values.worker.kubernetes.serviceAccount.name }}
{{- end }}

{{/* The PVC the chart mounts at /data/jobs: the training pods mount the same one. */}}
{{- define "genie.jobsClaim" -}}
{{- default (printf "%s-jobs" (include "genie.fullname" .)) .Values.worker.jobs.existingClaim }}
{{- end }}
