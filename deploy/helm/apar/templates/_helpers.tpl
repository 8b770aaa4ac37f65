{{/* Names, labels and the pieces every component shares. */}}

{{- define "apar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix: release-chart, or the release name when it already holds the chart's. */}}
{{- define "apar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "apar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "apar.labels" -}}
helm.sh/chart: {{ include "apar.chart" . }}
{{ include "apar.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: apar
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "apar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* A component's labels and selector labels: include with (dict "ctx" $ "component" "router"). */}}
{{- define "apar.componentLabels" -}}
{{ include "apar.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "apar.componentSelectorLabels" -}}
{{ include "apar.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Component names. */}}
{{- define "apar.router.fullname" -}}{{ include "apar.fullname" . }}-router{{- end }}
{{- define "apar.worker.fullname" -}}{{ include "apar.fullname" . }}-worker{{- end }}
{{- define "apar.kvmanager.fullname" -}}{{ include "apar.fullname" . }}-kvmanager{{- end }}
{{- define "apar.redis.fullname" -}}{{ include "apar.fullname" . }}-redis{{- end }}

{{- define "apar.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "apar.router.fullname" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: include with (dict "ctx" $ "image" .Values.router.image) */}}
{{- define "apar.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "apar.modelDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- end }}

{{- define "apar.servedModelName" -}}
{{- default (base .Values.model.path) .Values.model.servedModelName }}
{{- end }}

{{/* One KV manager shard's name (Deployment and Service): `(dict "ctx" . "i" INDEX)`. A single shard keeps
the plain name; with several, each is suffixed with its index. */}}
{{- define "apar.kvmanager.shardName" -}}
{{- if eq (int .ctx.Values.kvmanager.shards) 1 }}{{ include "apar.kvmanager.fullname" .ctx }}
{{- else }}{{ printf "%s-%d" (include "apar.kvmanager.fullname" .ctx) (int .i) }}{{ end }}
{{- end }}

{{/* The label that tells shards' pods apart (none with a single shard: its selector stays as it was). */}}
{{- define "apar.kvmanager.shardLabel" -}}
{{- if gt (int .ctx.Values.kvmanager.shards) 1 }}apar/kvmanager-shard: {{ .i | toString | quote }}{{ end }}
{{- end }}

{{/* A shard's Redis key prefix: its own within the one Redis (`apar:s0:`, `apar:s1:`, ...). */}}
{{- define "apar.kvmanager.shardPrefix" -}}
{{- if eq (int .ctx.Values.kvmanager.shards) 1 }}{{ .ctx.Values.kvmanager.redisPrefix }}
{{- else }}{{ printf "%ss%d:" .ctx.Values.kvmanager.redisPrefix (int .i) }}{{ end }}
{{- end }}

{{/* Every shard's address, comma-separated (`--kvmanager`): each worker picks its own by its id. */}}
{{- define "apar.kvmanager.address" -}}
{{- $addresses := list }}
{{- range $i := until (int .Values.kvmanager.shards) }}
{{- $name := include "apar.kvmanager.shardName" (dict "ctx" $ "i" $i) }}
{{- $addresses = append $addresses (printf "%s:%d" $name (int $.Values.kvmanager.ports.grpc)) }}
{{- end }}
{{- join "," $addresses }}
{{- end }}

{{/* Label matchers of the workers' series in Prometheus (a ServiceMonitor's job is its Service). */}}
{{- define "apar.worker.promSelector" -}}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "apar.worker.fullname" .) }}
{{- end }}

{{/* Every shard's series: one job per shard Service. */}}
{{- define "apar.kvmanager.promSelector" -}}
{{- printf "namespace=%q, job=~%q" .Release.Namespace (printf "%s(-[0-9]+)?" (include "apar.kvmanager.fullname" .)) }}
{{- end }}

{{- define "apar.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Writable emptyDirs under a read-only root: /tmp and the caches (the gRPC stubs are generated when the
    image is built, and only read at run time). */}}
{{- define "apar.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end }}

{{- define "apar.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- end }}

{{/* The model volume (named "model"). */}}
{{- define "apar.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "init" }}
  emptyDir:
    sizeLimit: {{ .Values.model.init.sizeLimit }}
{{- else if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "apar.fullname" . }}-model
{{- else }}
  persistentVolumeClaim:
    claimName: {{ required "model.existingClaim is required when model.source is existingClaim" .Values.model.existingClaim }}
{{- end }}
{{- end }}

{{/* The init container writing the model (source init): include with
(dict "ctx" $ "image" ... "resources" ... "command" <list, empty: model.init.command>) */}}
{{- define "apar.modelInit" -}}
{{- $ctx := .ctx }}
{{- if eq $ctx.Values.model.source "init" }}
- name: model
  image: {{ include "apar.image" (dict "ctx" $ctx "image" .image) }}
  imagePullPolicy: {{ .image.pullPolicy }}
  command:
    {{- toYaml (default $ctx.Values.model.init.command .command) | nindent 4 }}
  securityContext:
    {{- toYaml $ctx.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml (default .resources $ctx.Values.model.init.resources) | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $ctx.Values.model.mountPath }}
    {{- include "apar.scratchMounts" $ctx | nindent 4 }}
{{- end }}
{{- end }}

{{/* Checks of combinations the schema cannot express. */}}
{{- define "apar.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled both scale the workers: enable one" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) }}
{{- fail "redis.enabled is false: set redis.external.url" }}
{{- end }}
{{- if and (eq .Values.router.discovery "kubernetes") (not .Values.rbac.create) (not .Values.router.serviceAccount.name) }}
{{- fail "router.discovery kubernetes needs rbac.create, or router.serviceAccount.name of an account allowed to list and watch endpointslices" }}
{{- end }}
{{- $roles := .Values.tls.internal.roles }}
{{- if and (or $roles.router.secretName $roles.worker.secretName $roles.kvmanager.secretName) (not (and $roles.router.secretName $roles.worker.secretName $roles.kvmanager.secretName)) }}
{{- fail "tls.internal.roles: give the Secret of every role (router, worker, kvmanager), or none" }}
{{- end }}
{{- if and $roles.router.secretName .Values.tls.internal.secretName }}
{{- fail "tls.internal: give either secretName (one certificate for every service) or roles (one per role), not both" }}
{{- end }}
{{- if and $roles.router.secretName (or (eq $roles.router.name $roles.worker.name) (eq $roles.router.name $roles.kvmanager.name) (eq $roles.worker.name $roles.kvmanager.name)) }}
{{- fail "tls.internal.roles: each role needs its own name (the DNS name its certificate carries)" }}
{{- end }}
{{- if and .Values.auth.apiKeys.secretName (not .Values.auth.clusterToken.enabled) (not (include "apar.internalTLS.on" .)) }}
{{- fail "auth.apiKeys is set but the internal services are open: any pod could register as a worker and take the clients' prompts, or call a worker past the keys and limits. Keep auth.clusterToken.enabled, or set tls.internal (a NetworkPolicy alone is not enough: not every CNI enforces it)" }}
{{- end }}
{{- end }}

{{/* The Redis password Secret, if any: the KV manager gets it as APAR_REDIS_PASSWORD (never in its args).
    The in-release Redis's is the chart's own (apar.redis.generatedSecret) unless auth.existingSecret names one. */}}
{{- define "apar.redis.passwordSecret" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}{{ default (include "apar.redis.generatedSecret" .) .Values.redis.auth.existingSecret }}{{ end }}
{{- else }}{{ .Values.redis.external.existingSecret }}{{ end }}
{{- end }}

{{- define "apar.redis.generatedSecret" -}}{{ include "apar.redis.fullname" . }}-auth{{- end }}

{{/* The cluster token (services/cluster_auth.py): its Secret, and the flag, volume and mount of every
    internal service (router, workers, KV manager). */}}
{{- define "apar.clusterToken.secretName" -}}
{{- default (printf "%s-cluster-token" (include "apar.fullname" .)) .Values.auth.clusterToken.existingSecret }}
{{- end }}

{{- define "apar.clusterToken.args" -}}
{{- if .Values.auth.clusterToken.enabled }}
- {{ printf "--cluster-token-file=/etc/apar/cluster/%s" .Values.auth.clusterToken.key | quote }}
{{- else if not (include "apar.internalTLS.on" .) }}
{{- /* the services refuse to listen beyond loopback open unless told (validate refuses it with API keys) */}}
- "--allow-open-internal"
{{- end }}
{{- end }}

{{- define "apar.clusterToken.volumes" -}}
{{- if .Values.auth.clusterToken.enabled }}
- name: cluster-token
  secret:
    secretName: {{ include "apar.clusterToken.secretName" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "apar.clusterToken.mounts" -}}
{{- if .Values.auth.clusterToken.enabled }}
- name: cluster-token
  mountPath: /etc/apar/cluster
  readOnly: true
{{- end }}
{{- end }}

{{/* A random secret value kept across upgrades: the existing Secret's, else a new one.
    include with (dict "ctx" $ "name" SECRET "key" KEY) */}}
{{- define "apar.keptSecretValue" -}}
{{- $old := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $old $old.data (hasKey $old.data .key) }}{{ index $old.data .key }}{{ else }}{{ randAlphaNum 64 | b64enc }}{{ end }}
{{- end }}

{{/* NetworkPolicy peers: the pods of one component of the release. */}}
{{- define "apar.componentPeer" -}}
- podSelector:
    matchLabels:
      {{- include "apar.componentSelectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
{{- end }}

{{- define "apar.redis.passwordKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.passwordKey }}{{ else }}{{ .Values.redis.external.passwordKey }}{{ end }}
{{- end }}

{{/* The Redis URL the KV manager gets, without the password. */}}
{{- define "apar.redis.url" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:%d/0" (include "apar.redis.fullname" .) (int .Values.redis.port) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* A probe: include with (dict "mode" "grpc"|"tcp"|"exec" "port" N "service" "" "command" [...] "probe" .Values.x.probes.readiness).
    Kubernetes' gRPC probes cannot speak TLS: with it on, the chart uses tcp, or exec of services.healthcheck. */}}
{{- define "apar.probe" -}}
{{- if eq .mode "tcp" }}
tcpSocket:
  port: {{ int .port }}
{{- else if eq .mode "exec" }}
exec:
  command:
    {{- toYaml .command | nindent 4 }}
{{- else }}
grpc:
  port: {{ int .port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- toYaml .probe | nindent 0 }}
{{- end }}

{{/* Internal mutual TLS: one certificate every service shares (tls.internal.secretName), or one per role
    (tls.internal.roles.*.secretName): then each server answers only its callers' role (--tls-peer-names:
    the workers the routers', the KV manager the workers' and the routers') and each client checks the role
    of the server it dials (services/peer_names.py). The files' paths in the containers, their flags,
    volumes and mounts; include the component's with (dict "ctx" $ "component" "router|worker|kvmanager"). */}}
{{- define "apar.internalTLS.perRole" -}}
{{- if .Values.tls.internal.roles.router.secretName }}true{{ end }}
{{- end }}
{{- define "apar.internalTLS.on" -}}
{{- if or .Values.tls.internal.secretName (include "apar.internalTLS.perRole" .) }}true{{ end }}
{{- end }}
{{- define "apar.internalTLS.secret" -}}
{{- if include "apar.internalTLS.perRole" .ctx }}{{ (index .ctx.Values.tls.internal.roles .component).secretName }}
{{- else }}{{ .ctx.Values.tls.internal.secretName }}{{ end }}
{{- end }}
{{- define "apar.internalTLS.name" -}}
{{- if include "apar.internalTLS.perRole" .ctx }}{{ (index .ctx.Values.tls.internal.roles .component).name }}
{{- else }}{{ .ctx.Values.tls.internal.serverName }}{{ end }}
{{- end }}
{{- define "apar.internalTLS.cert" -}}/etc/apar/tls/internal/{{ .Values.tls.internal.certKey }}{{- end }}
{{- define "apar.internalTLS.key" -}}/etc/apar/tls/internal/{{ .Values.tls.internal.keyKey }}{{- end }}
{{- define "apar.internalTLS.ca" -}}
{{- if .Values.tls.internal.caSecretName }}/etc/apar/tls/internal-ca/{{ .Values.tls.internal.caKey }}
{{- else }}/etc/apar/tls/internal/{{ .Values.tls.internal.caKey }}{{ end }}
{{- end }}

{{/* Flags: include with (dict "ctx" $ "prefix" "--tls" "component" "worker") */}}
{{- define "apar.internalTLS.args" -}}
{{- $ctx := .ctx }}
{{- $roles := include "apar.internalTLS.perRole" $ctx }}
{{- if include "apar.internalTLS.on" $ctx }}
- {{ printf "%s-cert=%s" .prefix (include "apar.internalTLS.cert" $ctx) | quote }}
- {{ printf "%s-key=%s" .prefix (include "apar.internalTLS.key" $ctx) | quote }}
- {{ printf "%s-ca=%s" .prefix (include "apar.internalTLS.ca" $ctx) | quote }}
{{- if eq .component "router" }}
- {{ printf "%s-server-name=%s" .prefix (include "apar.internalTLS.name" (dict "ctx" $ctx "component" "worker")) | quote }}
{{- if and $roles (ne $ctx.Values.router.discovery "kubernetes") }}
- {{ printf "%s-kvmanager-name=%s" .prefix (include "apar.internalTLS.name" (dict "ctx" $ctx "component" "kvmanager")) | quote }}
{{- end }}
{{- else if eq .component "worker" }}
- {{ printf "%s-server-name=%s" .prefix (include "apar.internalTLS.name" (dict "ctx" $ctx "component" "kvmanager")) | quote }}
{{- if $roles }}
- {{ printf "%s-peer-names=%s" .prefix $ctx.Values.tls.internal.roles.router.name | quote }}
{{- end }}
{{- else if $roles }}
- {{ printf "%s-peer-names=%s,%s" .prefix $ctx.Values.tls.internal.roles.worker.name $ctx.Values.tls.internal.roles.router.name | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "apar.internalTLS.volumes" -}}
{{- $ctx := .ctx }}
{{- if include "apar.internalTLS.on" $ctx }}
- name: internal-tls
  secret:
    secretName: {{ include "apar.internalTLS.secret" . }}
    defaultMode: 0440
{{- with $ctx.Values.tls.internal.caSecretName }}
- name: internal-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
{{- end }}
{{- end }}
{{- end }}

{{- define "apar.internalTLS.mounts" -}}
{{- if include "apar.internalTLS.on" . }}
- name: internal-tls
  mountPath: /etc/apar/tls/internal
  readOnly: true
{{- if .Values.tls.internal.caSecretName }}
- name: internal-ca
  mountPath: /etc/apar/tls/internal-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* The readiness check over mutual TLS, with the component's own certificate checking its own name:
    include with (dict "ctx" $ "component" "worker" "port" N "service" "") */}}
{{- define "apar.internalTLS.healthcheck" -}}
{{- $ctx := .ctx }}
- python
- -m
- services.healthcheck
- {{ printf "127.0.0.1:%d" (int .port) | quote }}
{{- with .service }}
- {{ printf "--service=%s" . | quote }}
{{- end }}
- {{ printf "--tls-cert=%s" (include "apar.internalTLS.cert" $ctx) | quote }}
- {{ printf "--tls-key=%s" (include "apar.internalTLS.key" $ctx) | quote }}
- {{ printf "--tls-ca=%s" (include "apar.internalTLS.ca" $ctx) | quote }}
- {{ printf "--tls-server-name=%s" (include "apar.internalTLS.name" (dict "ctx" $ctx "component" .component)) | quote }}
{{- end }}
