{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "courier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: the release name, plus the chart name unless the release already has it. */}}
{{- define "courier.fullname" -}}
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

{{- define "courier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: `courier.labels` on every object, `courier.selectorLabels` to select pods. */}}
{{- define "courier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "courier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "courier.labels" -}}
helm.sh/chart: {{ include "courier.chart" . }}
{{ include "courier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: courier
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "redis") */}}
{{- define "courier.componentLabels" -}}
{{ include "courier.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "courier.componentSelector" -}}
{{ include "courier.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images -------------------------------------------------------------------------------- */}}

{{/* repository@digest when a digest is set, else repository:tag (tag defaults to appVersion). */}}
{{- define "courier.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .ctx.Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{- define "courier.servingImage" -}}
{{ include "courier.image" (dict "image" .Values.images.serving "ctx" .) }}
{{- end }}

{{- define "courier.jobsImage" -}}
{{ include "courier.image" (dict "image" .Values.images.jobs "ctx" .) }}
{{- end }}

{{/* Shared pieces of pod specs ------------------------------------------------------------ */}}

{{- define "courier.serviceAccountName" -}}
{{ include "courier.fullname" . }}
{{- end }}

{{- define "courier.claimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-data" (include "courier.fullname" .)) }}
{{- end }}

{{/* Where the shared volume is mounted; the images link /app/data, /app/artifacts and /app/reports into it. */}}
{{- define "courier.dataDir" -}}/data{{- end }}

{{/* A path of the serve config's args on the volume: relative ones are taken from the data dir. */}}
{{- define "courier.onVolume" -}}
{{- if hasPrefix "/" .path }}{{ .path }}{{ else }}{{ include "courier.dataDir" .ctx }}/{{ .path }}{{ end }}
{{- end }}

{{/* What the Ray head waits for, one `model=champion` a line: the champion of every model a slot of the
     rendered serve config serves. Not the versions themselves: those live in serveConfigV2 only, so that a
     version change leaves the Ray pods (rayClusterConfig, which KubeRay hashes) untouched. */}}
{{- define "courier.servedModels" -}}
{{- $cfg := include "courier.serveConfig" . | fromYaml }}
{{- range $model, $m := .Values.serving.models }}
{{- range $app := $cfg.applications }}
{{- range $dep := $app.deployments }}
{{- if and (eq $dep.name $m.deployment) (kindIs "map" $dep.user_config) }}
{{ $model }}=champion
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "courier.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "courier.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* imagePullSecrets at a given indent, or nothing: (dict "ctx" $ "indent" 6). */}}
{{- define "courier.imagePullSecrets" -}}
{{- with .ctx.Values.imagePullSecrets }}
{{- printf "imagePullSecrets:\n%s" (toYaml .) | nindent $.indent }}
{{- end }}
{{- end }}

{{/* host:port of the Feast online store (the in-chart Redis or the external one). */}}
{{- define "courier.redisAddress" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis:6379" (include "courier.fullname" .) }}
{{- else if .Values.redis.externalAddress }}
{{- .Values.redis.externalAddress }}
{{- else }}
{{- fail "redis.enabled is false, so set redis.externalAddress to the host:port of your Redis" }}
{{- end }}
{{- end }}

{{- define "courier.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "courier.fullname" .)) }}
{{- end }}

{{/* The model registry ---------------------------------------------------------------------- */}}

{{/* Where the registry lives: "postgresql" (the chart's), "external" (registry.uri or .existingSecret) or
     "sqlite" (a file on the shared volume). SQLite takes one writer: refused with two. */}}
{{- define "courier.registryBackend" -}}
{{- $r := .Values.registry }}
{{- if $r.postgresql.enabled }}postgresql
{{- else if or $r.uri $r.existingSecret }}external
{{- else }}
{{- $writers := list }}
{{- if .Values.train.enabled }}{{ $writers = append $writers "the training Job" }}{{ end }}
{{- if .Values.retrain.enabled }}{{ $writers = append $writers "the retrain CronJob" }}{{ end }}
{{- if gt (len $writers) 1 }}
{{- fail (printf "registry: with registry.postgresql.enabled=false and no registry.uri the registry is a SQLite file on the shared volume, which takes one writer, but %s both write it: set registry.postgresql.enabled=true, or registry.uri (or registry.existingSecret) to an external MLflow backend, or retrain.enabled=false" (join " and " $writers)) }}
{{- end }}sqlite
{{- end }}
{{- end }}

{{- define "courier.registrySecretName" -}}
{{- $r := .Values.registry }}
{{- if $r.postgresql.enabled }}
{{- $r.postgresql.existingSecret | default (printf "%s-registry" (include "courier.fullname" .)) }}
{{- else }}
{{- $r.existingSecret | default (printf "%s-registry" (include "courier.fullname" .)) }}
{{- end }}
{{- end }}

{{/* host:port of the chart's PostgreSQL. */}}
{{- define "courier.registryHost" -}}
{{ include "courier.fullname" . }}-registry:5432
{{- end }}

{{/* The registry's environment: COURIER_REGISTRY (MLflow tracking URI) and COURIER_ARTIFACTS (the artifact root). */}}
{{- define "courier.registryEnv" -}}
{{- $backend := include "courier.registryBackend" . }}
{{- $pg := .Values.registry.postgresql -}}
- name: COURIER_ARTIFACTS
  value: {{ include "courier.dataDir" . }}/artifacts
{{- if eq $backend "postgresql" }}
- name: COURIER_REGISTRY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "courier.registrySecretName" . }}
      key: postgres-password
- name: COURIER_REGISTRY
  value: "postgresql+psycopg2://{{ $pg.user }}:$(COURIER_REGISTRY_PASSWORD)@{{ include "courier.registryHost" . }}/{{ $pg.database }}"
{{- else if eq $backend "external" }}
- name: COURIER_REGISTRY
  valueFrom:
    secretKeyRef:
      name: {{ include "courier.registrySecretName" . }}
      key: registry-uri
{{- else }}
- name: COURIER_REGISTRY
  value: "sqlite:///{{ include "courier.dataDir" . }}/artifacts/registry.db"
{{- end }}
{{- end }}

{{/* Environment every Courier container shares: where the data is and how to reach Redis. */}}
{{- define "courier.commonEnv" -}}
- name: COURIER_DATA_DIR
  value: {{ include "courier.dataDir" . }}
{{- if .Values.redis.auth.enabled }}
{{- /* Not REDIS_PASSWORD: KubeRay refuses that name on the head when GCS fault tolerance is on. */}}
- name: COURIER_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "courier.redisSecretName" . }}
      key: redis-password
- name: COURIER_REDIS
  value: "{{ include "courier.redisAddress" . }},password=$(COURIER_REDIS_PASSWORD)"
{{- else }}
- name: COURIER_REDIS
  value: {{ include "courier.redisAddress" . | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: FEAST_USAGE
  value: "False"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* The serving URL inside the cluster: the Service KubeRay creates for the RayService. */}}
{{- define "courier.serveUrl" -}}
http://{{ include "courier.fullname" . }}-serve-svc.{{ .Release.Namespace }}.svc:8000
{{- end }}

{{- define "courier.dataVolume" -}}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "courier.claimName" . }}
{{- end }}

{{/* The Ray Serve config ------------------------------------------------------------------ */}}

{{/*
serveConfigV2: serving/serve_config.yaml (files/serve_config.yaml links to it) with the cluster
settings applied, then the user's overrides. Precedence: values > cluster settings > the file.
Cluster settings: host 0.0.0.0, the artifact root (args.artifacts) and data_dir on the volume, and
Redis as the online store; then serving.models into the model slots (courier.applyModelSlots).
*/}}
{{- define "courier.serveConfig" -}}
{{- $raw := .Files.Get "files/serve_config.yaml" }}
{{- if not $raw }}
{{- fail "files/serve_config.yaml is missing or empty: it must be a symlink to serving/serve_config.yaml (helm follows it)" }}
{{- end }}
{{- $cfg := fromYaml $raw }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "files/serve_config.yaml is not valid YAML: %s" $cfg.Error) }}
{{- end }}
{{- $http := $cfg.http_options | default dict }}
{{- $_ := set $http "host" "0.0.0.0" }}
{{- $_ := set $cfg "http_options" $http }}
{{- $known := list }}
{{- range $app := $cfg.applications }}
{{- $args := $app.args | default dict }}
{{- if kindIs "string" $args.artifacts }}
{{- $_ := set $args "artifacts" (include "courier.onVolume" (dict "ctx" $ "path" $args.artifacts)) }}
{{- end }}
{{- $_ := set $args "online_store" "redis" }}
{{- /* API keys (templates/auth.yaml): the Ray pods read the digests from COURIER_API_KEYS. */}}
{{- $auth := $args.auth | default dict }}
{{- $_ := set $auth "enabled" $.Values.auth.enabled }}
{{- $_ := set $auth "keys_env" "COURIER_API_KEYS" }}
{{- $_ := set $auth "rate_per_s" $.Values.auth.rateLimit.requestsPerSecond }}
{{- $_ := set $auth "burst" $.Values.auth.rateLimit.burst }}
{{- $_ := set $args "auth" $auth }}
{{- if hasKey $args "data_dir" }}
{{- $_ := set $args "data_dir" (include "courier.dataDir" $) }}
{{- end }}
{{- $_ := mergeOverwrite $args (deepCopy $.Values.serve.args) }}
{{- $_ := set $app "args" $args }}
{{- range $dep := $app.deployments }}
{{- $known = append $known $dep.name }}
{{- with (get $.Values.serve.deployments $dep.name) }}
{{- if hasKey . "user_config" }}
{{- fail (printf "serve.deployments.%s.user_config: set model versions through serving.models.<model> (version, challenger, shadow, canary), the one source of every slot that serves a model" $dep.name) }}
{{- end }}
{{- $_ := mergeOverwrite $dep (deepCopy .) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $_ := .Values.serve.deployments }}
{{- if not (has $name $known) }}
{{- fail (printf "serve.deployments.%s: no deployment of that name in serving/serve_config.yaml (known: %s)" $name (join ", " $known)) }}
{{- end }}
{{- end }}
{{- include "courier.applyModelSlots" (dict "ctx" $ "cfg" $cfg "known" $known) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
serving.models.<model> into the serve config's user_configs, in place on .cfg: each set key (version,
challenger, shadow, canary) replaces the one in the slot of the model's deployment; then every other
deployment whose user_config has a slot named after the model (the Ingress's `eta`) gets a copy of that
slot, so the two can never differ. A key the slot does not have (Retrieval serves one version) fails.
*/}}
{{- define "courier.applyModelSlots" -}}
{{- $ctx := .ctx }}
{{- range $model, $m := $ctx.Values.serving.models }}
{{- $slot := dict }}
{{- $found := false }}
{{- range $app := $.cfg.applications }}
{{- range $dep := $app.deployments }}
{{- if eq $dep.name $m.deployment }}
{{- $found = true }}
{{- if not (kindIs "map" $dep.user_config) }}
{{- fail (printf "serving.models.%s: deployment %s in serving/serve_config.yaml has no user_config slot to carry the model version" $model $dep.name) }}
{{- end }}
{{- $slot = $dep.user_config }}
{{- range $key := list "version" "challenger" }}
{{- with (get $m $key) }}
{{- if not (hasKey $slot $key) }}
{{- fail (printf "serving.models.%s.%s: the %s slot has no %s (it serves one version)" $model $key $dep.name $key) }}
{{- end }}
{{- $_ := set $slot $key (toString .) }}
{{- end }}
{{- end }}
{{- range $key := list "shadow" "canary" }}
{{- if and (hasKey $m $key) (not (kindIs "invalid" (get $m $key))) }}
{{- if not (hasKey $slot $key) }}
{{- fail (printf "serving.models.%s.%s: the %s slot has no %s (it serves one version)" $model $key $dep.name $key) }}
{{- end }}
{{- $_ := set $slot $key (get $m $key | float64) }}
{{- end }}
{{- end }}
{{- if and (or (gt (float64 ($slot.shadow | default 0)) 0.0) (gt (float64 ($slot.canary | default 0)) 0.0)) (not $slot.challenger) }}
{{- fail (printf "serving.models.%s: shadow %v and canary %v need a challenger (serving.models.%s.challenger), or both shares at 0" $model ($slot.shadow | default 0) ($slot.canary | default 0) $model) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "serving.models.%s.deployment: no deployment %s in serving/serve_config.yaml (known: %s)" $model $m.deployment (join ", " $.known)) }}
{{- end }}
{{- range $app := $.cfg.applications }}
{{- range $dep := $app.deployments }}
{{- if and (ne $dep.name $m.deployment) (kindIs "map" $dep.user_config) (kindIs "map" (get ($dep.user_config | default dict) $model)) }}
{{- $_ := set $dep.user_config $model (deepCopy $slot) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Ray's process settings: serving/ray_env.yaml (files/ray_env.yaml links to it), each one replaced
by an entry of serve.env with the same name; serve.env's other entries follow.
*/}}
{{- define "courier.rayEnv" -}}
{{- $raw := .Files.Get "files/ray_env.yaml" }}
{{- if not $raw }}
{{- fail "files/ray_env.yaml is missing or empty: it must be a symlink to serving/ray_env.yaml (helm follows it)" }}
{{- end }}
{{- $shipped := fromYaml $raw }}
{{- if hasKey $shipped "Error" }}
{{- fail (printf "files/ray_env.yaml is not valid YAML: %s" $shipped.Error) }}
{{- end }}
{{- $overridden := dict }}
{{- range .Values.serve.env }}
{{- $_ := set $overridden .name true }}
{{- end }}
{{- range $name := keys $shipped | sortAlpha }}
{{- if not (hasKey $overridden $name) }}
{{- $value := get $shipped $name | toString }}
- name: {{ $name }}
  {{- /* a relative *_PATH is one of Courier's files: the images hold them under /app (serving.config.load_ray_env) */}}
  value: {{ ternary (printf "/app/%s" $value) $value (and (hasSuffix "_PATH" $name) (not (hasPrefix "/" $value))) | quote }}
{{- end }}
{{- end }}
{{- with .Values.serve.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Job names carry a hash of their pod spec: an upgrade that changes the spec runs a new Job
     (Job templates are immutable), an upgrade that does not leaves the finished one alone. */}}
{{- define "courier.jobName" -}}
{{- printf "%s-%s-%s" (include "courier.fullname" .ctx) .component (.spec | sha256sum | trunc 8) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Security-scan waivers --------------------------------------------------------------------

checkov skip annotations for one workload, derived from the values that cause them, so a user
who changes the value (pushes images by digest, picks a high uid...) loses the waiver with it.
Each reason names the value; values.yaml explains the waiver next to that value.
(dict "ctx" $ "images" (list $.Values.images.jobs) "extra" (list "CKV_K8S_38")); "registry" true for a pod
that gets the registry's URI (COURIER_REGISTRY) from a Secret through its environment, "apiKey" true for one
that gets an API key (COURIER_API_KEY).
*/}}
{{- define "courier.checkovWaivers" -}}
{{- $v := .ctx.Values }}
{{- $reasons := dict
  "CKV_K8S_15" "images.*.pullPolicy is IfNotPresent: make images loads the images into kind or minikube, no registry serves them"
  "CKV_K8S_43" "images.*.digest is empty: locally built images have no registry digest until pushed"
  "CKV_K8S_40" "podSecurityContext.runAsUser is 1000, the ray user that owns the rayproject/ray Python environment"
  "CKV_K8S_35" "redis.auth.enabled: Feast takes the Redis password inside its connection string, COURIER_REDIS"
  "CKV_K8S_35/registry" "registry: MLflow takes the backend's credentials only inside its tracking URI, COURIER_REGISTRY"
  "CKV_K8S_35/auth" "auth.enabled: the chart's clients of serving take their API key from COURIER_API_KEY"
  "CKV_K8S_38" "chaos: the drill deletes serving pods through the Kubernetes API, so this pod alone mounts a token"
  "CKV_K8S_8" "tests: the helm test pod runs once to completion; probes do not apply"
  "CKV_K8S_9" "tests: the helm test pod runs once to completion; probes do not apply" }}
{{- $checks := list }}
{{- range .images }}
{{- if ne .pullPolicy "Always" }}{{ $checks = append $checks "CKV_K8S_15" }}{{ end }}
{{- if not .digest }}{{ $checks = append $checks "CKV_K8S_43" }}{{ end }}
{{- end }}
{{- if lt (int $v.podSecurityContext.runAsUser) 10000 }}{{ $checks = append $checks "CKV_K8S_40" }}{{ end }}
{{- if $v.redis.auth.enabled }}{{ $checks = append $checks "CKV_K8S_35" }}
{{- else if and .apiKey $v.auth.enabled }}{{ $checks = append $checks "CKV_K8S_35/auth" }}
{{- else if and .registry (ne (include "courier.registryBackend" .ctx) "sqlite") }}{{ $checks = append $checks "CKV_K8S_35/registry" }}{{ end }}
{{- range $i, $key := concat (uniq $checks) (.extra | default list) }}
checkov.io/skip{{ add1 $i }}: {{ printf "%s=%s" (first (splitList "/" $key)) (index $reasons $key) | quote }}
{{- end }}
{{- end }}

{{/* API keys (templates/auth.yaml) ---------------------------------------------------------- */}}

{{- define "courier.apiKeysSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-keys" (include "courier.fullname" .)) }}
{{- end }}

{{/* COURIER_API_KEY of one of the chart's own clients, as an env list (YAML), or nothing with auth off:
     (dict "ctx" $ "client" "internal"). The client must be one of auth.clients. */}}
{{- define "courier.apiKeyEnv" -}}
{{- if .ctx.Values.auth.enabled }}
{{- if not (hasKey .ctx.Values.auth.clients .client) }}
{{- fail (printf "auth.clients.%s is missing: the chart's %s workloads call serving with that client's key" .client .client) }}
{{- end }}
- name: COURIER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "courier.apiKeysSecretName" .ctx }}
      key: {{ .client }}-key
{{- end }}
{{- end }}
