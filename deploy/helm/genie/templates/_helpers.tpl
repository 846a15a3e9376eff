{{/* Names, labels, images and the pieces every pod shares. */}}

{{- define "genie.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genie.fullname" -}}
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

{{/* A component's resource name: (dict "ctx" $ "component" "gateway"). */}}
{{- define "genie.componentName" -}}
{{- printf "%s-%s" (include "genie.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genie.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genie.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "genie.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "genie.selectorLabels" . }}
app.kubernetes.io/part-of: genie
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* Labels of resources that belong to the release, not to one component (ConfigMap, Secrets). */}}
{{- define "genie.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "genie.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: genie
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Genie image: (dict "ctx" $ "gpu" true|false). */}}
{{- define "genie.image" -}}
{{- $img := ternary .ctx.Values.gpu.image .ctx.Values.image .gpu }}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) }}
{{- end }}

{{/* Whether a component with `gpu: <flag>` gets a GPU: (dict "ctx" $ "want" <flag>). Prints "true" or "". */}}
{{- define "genie.useGpu" -}}
{{- if and .ctx.Values.gpu.enabled .want }}true{{ end }}
{{- end }}

{{/* resources, plus one nvidia.com/gpu limit when gpu: (dict "resources" <map> "gpu" <bool>). */}}
{{- define "genie.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if .gpu }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits "nvidia.com/gpu" 1 }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod-level placement and identity shared by every pod: (dict "ctx" $ "gpu" <bool> ["serviceAccount" <name>]). */}}
{{- define "genie.podCommon" -}}
{{- /* Only a pod that talks to the API server (the train worker's launcher) gets a ServiceAccount token. */ -}}
{{- if .serviceAccount -}}
automountServiceAccountToken: true
serviceAccountName: {{ .serviceAccount }}
{{- else -}}
automountServiceAccountToken: false
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .gpu }}
{{- with .ctx.Values.gpu.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .ctx.Values.gpu.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Env every Genie container gets: a writable HOME on the read-only root filesystem. */}}
{{- define "genie.baseEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* Volumes and mounts for /tmp and the world. */}}
{{- define "genie.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if .Values.world.existingClaim }}
- name: worlds
  persistentVolumeClaim:
    claimName: {{ .Values.world.existingClaim }}
    readOnly: true
{{- end }}
{{- if .Values.catalogue.enabled }}
- name: catalogue
  persistentVolumeClaim:
    claimName: {{ include "genie.catalogueClaim" . }}
{{- end }}
{{- end }}

{{/* The world catalogue's PVC: the one given, or the chart's. */}}
{{- define "genie.catalogueClaim" -}}
{{- .Values.catalogue.existingClaim | default (printf "%s-catalogue" (include "genie.fullname" .)) }}
{{- end }}

{{/* The catalogue's mount (dict "ctx" $ "write" bool): workers publish into it, gateways and Triton only read. The
same path everywhere: a gateway tells Triton which version directory to load by its path. */}}
{{- define "genie.catalogueMount" -}}
{{- if .ctx.Values.catalogue.enabled }}
- name: catalogue
  mountPath: {{ .ctx.Values.catalogue.mountPath }}
  {{- if not .write }}
  readOnly: true
  {{- end }}
{{- end }}
{{- end }}

{{- define "genie.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.world.existingClaim }}
- name: worlds
  mountPath: {{ .Values.world.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Model name -> "host:8001" of its Triton Service, as --triton-model-urls / GENIE_TRITON_MODEL_URLS want it;
with gateway.sessionAffinity "dns:<headless Service>:8001", every pod of the model (services/gateway/routing.py). */}}
{{- define "genie.tritonModelUrls" -}}
{{- $urls := list }}
{{- $format := ternary "%s=dns:%s-pods:8001" "%s=%s:8001" (.Values.gateway.sessionAffinity | default false) }}
{{- range $model := list "tokenizer" "dynamics" "lam" }}
{{- $urls = append $urls (printf $format $model (include "genie.componentName" (dict "ctx" $ "component" $model))) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{- define "genie.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "genie.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{- define "genie.tokensSecretKey" -}}
{{- ternary .Values.gateway.auth.existingSecretKey "tokens" (ne .Values.gateway.auth.existingSecret "") }}
{{- end }}

{{- define "genie.redisSecretName" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecret }}
{{- else }}
{{- printf "%s-redis-url" (include "genie.fullname" .) }}
{{- end }}
{{- end }}

{{- define "genie.redisSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecretKey }}
{{- else }}
{{- print "redis-url" }}
{{- end }}
{{- end }}

{{/* The Redis base URL (no DB) the chart writes into its Secret. */}}
{{- define "genie.redisBaseUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s://%s:6379" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "genie.componentName" (dict "ctx" . "component" "redis")) }}
{{- else if .Values.redis.external.url }}
{{- .Values.redis.external.url | trimSuffix "/" }}
{{- else if not .Values.redis.external.existingSecret }}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- end }}

{{/* The Secret and key of the bundled Redis's password (its own, generated, or redis.auth.existingSecret). */}}
{{- define "genie.redisPasswordSecretName" -}}
{{- default (printf "%s-redis-password" (include "genie.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "genie.redisPasswordSecretKey" -}}
{{- ternary .Values.redis.auth.existingSecretKey "redis-password" (ne .Values.redis.auth.existingSecret "") }}
{{- end }}

{{/* GENIE_REDIS_BASE_URL from the Secret, then the full URLs built from it (Kubernetes expands $(VAR) in env).
     With the bundled Redis the URL carries no password: the clients read it from GENIE_REDIS_PASSWORD (the
     contract with services/, deploy/README.md), so no password ends up in a URL, an argument or a ConfigMap. */}}
{{- define "genie.redisEnv" -}}
- name: GENIE_REDIS_BASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "genie.redisSecretName" . }}
      key: {{ include "genie.redisSecretKey" . }}
{{- if .Values.redis.enabled }}
- name: GENIE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "genie.redisPasswordSecretName" . }}
      key: {{ include "genie.redisPasswordSecretKey" . }}
{{- if .Values.redis.sentinel.enabled }}
{{- /* The bundled Sentinels require the same password as the data nodes (their requirepass). */}}
- name: GENIE_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "genie.redisPasswordSecretName" . }}
      key: {{ include "genie.redisPasswordSecretKey" . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Celery side's names for the same password (services/worker/settings.py: GENIE_BROKER_PASSWORD, put into
     the broker and result-backend URLs that carry none) and, with Sentinel, the Sentinels the broker, the result
     backend and the job records follow to the current master (the base URL alone would stay on one pod). */}}
{{- define "genie.brokerEnv" -}}
{{- if .Values.redis.enabled }}
- name: GENIE_BROKER_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "genie.redisPasswordSecretName" . }}
      key: {{ include "genie.redisPasswordSecretKey" . }}
{{- end }}
{{- with include "genie.redisSentinels" . }}
- name: GENIE_BROKER_SENTINELS
  value: {{ . | quote }}
- name: GENIE_BROKER_SENTINEL_MASTER
  value: {{ include "genie.redisSentinelMaster" $ | quote }}
{{- if $.Values.redis.enabled }}
- name: GENIE_BROKER_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "genie.redisPasswordSecretName" $ }}
      key: {{ include "genie.redisPasswordSecretKey" $ }}
{{- end }}
{{- end }}
{{- end }}

{{/* The PVC the chart mounts at /data/jobs (its own, or worker.jobs.existingClaim): training pods mount it too. */}}
{{- define "genie.jobsClaim" -}}
{{- default (printf "%s-jobs" (include "genie.fullname" .)) .Values.worker.jobs.existingClaim }}
{{- end }}

{{/* The Sentinels the gateway asks for the master, host:port,...: the bundled ones (one per Redis pod, by its
     stable DNS name) or redis.external.sentinels; empty without Sentinel. */}}
{{- define "genie.redisSentinels" -}}
{{- if and .Values.redis.enabled .Values.redis.sentinel.enabled }}
{{- $name := include "genie.componentName" (dict "ctx" . "component" "redis") }}
{{- $hosts := list }}
{{- range $i := until (int .Values.redis.sentinel.replicas) }}
{{- $hosts = append $hosts (printf "%s-%d.%s-headless:26379" $name $i $name) }}
{{- end }}
{{- join "," $hosts }}
{{- else if not .Values.redis.enabled }}
{{- .Values.redis.external.sentinels }}
{{- end }}
{{- end }}

{{- define "genie.redisSentinelMaster" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.sentinel.masterName }}{{ else }}{{ .Values.redis.external.sentinelMaster }}{{ end }}
{{- end }}

{{/* NetworkPolicy peers: this release's pods of some components, (dict "ctx" $ "components" (list ...)); and a
     configured namespace + pod selector pair (networkPolicy.ingressController / .prometheus). */}}
{{- define "genie.releasePods" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "genie.name" .ctx }}
      app.kubernetes.io/instance: {{ .ctx.Release.Name }}
    matchExpressions:
      - {key: app.kubernetes.io/component, operator: In, values: {{ toJson .components }}}
{{- end }}
{{- define "genie.peer" -}}
- namespaceSelector:
    {{- toYaml .namespaceSelector | nindent 4 }}
  podSelector:
    {{- toYaml .podSelector | nindent 4 }}
{{- end }}

{{/* The gateway's serving TLS Secret: gateway.tls.existingSecret, else the one its cert-manager Certificate fills. */}}
{{- define "genie.gatewayTlsSecret" -}}
{{- with .Values.gateway.tls }}
{{- if .existingSecret }}{{ .existingSecret }}
{{- else if .certManager.issuerName }}{{ include "genie.componentName" (dict "ctx" $ "component" "gateway-tls") }}
{{- else }}{{ fail "gateway.tls.enabled: set gateway.tls.existingSecret or gateway.tls.certManager.issuerName" }}
{{- end }}
{{- end }}
{{- end }}

{{/* GENIE_TRITON_CA and its mount for pods that call Triton when triton.tls.enabled: (dict "ctx" $ "part" "env"|"mount"|"volume"). */}}
{{- define "genie.tritonCa" -}}
{{- if .ctx.Values.triton.tls.enabled }}
{{- if not .ctx.Values.triton.tls.existingSecret }}{{ fail "triton.tls.enabled: set triton.tls.existingSecret" }}{{ end }}
{{- if eq .part "env" }}
- name: GENIE_TRITON_CA
  value: /etc/genie/triton-ca/ca.crt
{{- else if eq .part "mount" }}
- name: triton-ca
  mountPath: /etc/genie/triton-ca
  readOnly: true
{{- else }}
- name: triton-ca
  secret:
    secretName: {{ .ctx.Values.triton.tls.existingSecret }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}
{{- end }}

{{/* GENIE_REDIS_CA and its mount for the bundled Redis's clients when redis.tls.enabled: (dict "ctx" $ "part" "env"|"mount"|"volume"
     ["broker" true]: the workers' Celery settings also get it as GENIE_BROKER_CA). */}}
{{- define "genie.redisCa" -}}
{{- if and .ctx.Values.redis.enabled .ctx.Values.redis.tls.enabled }}
{{- if eq .part "env" }}
- name: GENIE_REDIS_CA
  value: /etc/genie/redis-ca/ca.crt
{{- if .broker }}
- name: GENIE_BROKER_CA
  value: /etc/genie/redis-ca/ca.crt
{{- end }}
{{- else if eq .part "mount" }}
- name: redis-ca
  mountPath: /etc/genie/redis-ca
  readOnly: true
{{- else }}
- name: redis-ca
  secret:
    secretName: {{ required "redis.tls.enabled: set redis.tls.existingSecret" .ctx.Values.redis.tls.existingSecret }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}
{{- end }}

{{/* Checks triton.tls's combinations (from templates/triton/deployment.yaml, rendered once per release). */}}
{{- define "genie.tritonTlsCheck" -}}
{{- with .Values.triton.tls }}
{{- if and .clientCA (not .enabled) }}
{{- fail "triton.tls.clientCA needs triton.tls.enabled (mutual TLS is TLS plus client certificates)" }}
{{- end }}
{{- if and (or .clientSecret .certManager.issuerName) (not .enabled) }}
{{- fail "triton.tls.clientSecret / triton.tls.certManager.issuerName need triton.tls.enabled (a client certificate is only presented over TLS)" }}
{{- end }}
{{- if and .clientCA (not .clientSecret) (not .certManager.issuerName) }}
{{- fail "triton.tls.clientCA: set triton.tls.clientSecret or triton.tls.certManager.issuerName (the gateway's and rollout workers' client certificate)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret of the client certificate the gateway and rollout workers present to Triton: triton.tls.clientSecret,
     else the one its cert-manager Certificate fills; empty without either (or without triton.tls). A certificate is
     presented whenever one is configured, also before triton.tls.clientCA is on: give the callers certificates
     first, then require them, and no call fails in between. */}}
{{- define "genie.tritonClientSecret" -}}
{{- with .Values.triton.tls }}
{{- if .enabled }}
{{- if .clientSecret }}{{ .clientSecret }}
{{- else if .certManager.issuerName }}{{ include "genie.componentName" (dict "ctx" $ "component" "triton-client") }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* GENIE_TRITON_CERT/KEY and their read-only mount for pods that call Triton, when they have a client certificate:
     (dict "ctx" $ "part" "env"|"mount"|"volume"). Paths, never contents: the files come from the Secret. */}}
{{- define "genie.tritonClientCert" -}}
{{- with include "genie.tritonClientSecret" .ctx }}
{{- if eq $.part "env" }}
- name: GENIE_TRITON_CERT
  value: /etc/genie/triton-client/tls.crt
- name: GENIE_TRITON_KEY
  value: /etc/genie/triton-client/tls.key
{{- else if eq $.part "mount" }}
- name: triton-client
  mountPath: /etc/genie/triton-client
  readOnly: true
{{- else }}
- name: triton-client
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- end }}
{{- end }}

{{/* A Triton pod's probe of a health path: (dict "tls" <bool> "path" "/v2/health/ready"). Plaintext: the kubelet's
     httpGet on the http port. TLS: Triton's HTTP binds 127.0.0.1, which only the pod reaches, so an exec probe asks
     it there (urlopen raises, and python exits 1, on anything but a 2xx). */}}
{{- define "genie.tritonProbe" -}}
{{- if .tls -}}
exec:
  command: ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000{{ .path }}', timeout=2)"]
{{- else -}}
httpGet:
  path: {{ .path }}
  port: http
{{- end }}
{{- end }}
