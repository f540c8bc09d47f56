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

{{/* What the Ray head waits for, one path a line: each model's manifest and the Feast registry. */}}
{{- define "courier.servingInputs" -}}
{{- $cfg := include "courier.serveConfig" . | fromYaml }}
{{- range $app := $cfg.applications }}
{{- range $key, $value := $app.args }}
{{- if and (hasSuffix "model_dir" $key) (kindIs "string" $value) }}
{{ $value }}/manifest.json
{{- else if kindIs "map" $value }}
{{- range $inner, $path := $value }}
{{- if and (hasSuffix "model_dir" $inner) (kindIs "string" $path) }}
{{ $path }}/manifest.json
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{ include "courier.dataDir" . }}/feast/registry.db
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
Cluster settings: host 0.0.0.0, every relative *model_dir (top level or one level down, as in
args.feed) and data_dir on the volume, and Redis as the online store.
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
{{- range $key, $value := $args }}
{{- if and (hasSuffix "model_dir" $key) (kindIs "string" $value) }}
{{- $_ := set $args $key (include "courier.onVolume" (dict "ctx" $ "path" $value)) }}
{{- else if kindIs "map" $value }}
{{- range $inner, $path := $value }}
{{- if and (hasSuffix "model_dir" $inner) (kindIs "string" $path) }}
{{- $_ := set $value $inner (include "courier.onVolume" (dict "ctx" $ "path" $path)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $args "online_store" "redis" }}
{{- if hasKey $args "data_dir" }}
{{- $_ := set $args "data_dir" (include "courier.dataDir" $) }}
{{- end }}
{{- $_ := mergeOverwrite $args (deepCopy $.Values.serve.args) }}
{{- $_ := set $app "args" $args }}
{{- range $dep := $app.deployments }}
{{- $known = append $known $dep.name }}
{{- with (get $.Values.serve.deployments $dep.name) }}
{{- $_ := mergeOverwrite $dep (deepCopy .) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $_ := .Values.serve.deployments }}
{{- if not (has $name $known) }}
{{- fail (printf "serve.deployments.%s: no deployment of that name in serving/serve_config.yaml (known: %s)" $name (join ", " $known)) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
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
- name: {{ $name }}
  value: {{ get $shipped $name | toString | quote }}
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
(dict "ctx" $ "images" (list $.Values.images.jobs) "extra" (list "CKV_K8S_38"))
*/}}
{{- define "courier.checkovWaivers" -}}
{{- $v := .ctx.Values }}
{{- $reasons := dict
  "CKV_K8S_15" "images.*.pullPolicy is IfNotPresent: make images loads the images into kind or minikube, no registry serves them"
  "CKV_K8S_43" "images.*.digest is empty: locally built images have no registry digest until pushed"
  "CKV_K8S_40" "podSecurityContext.runAsUser is 1000, the ray user that owns the rayproject/ray Python environment"
  "CKV_K8S_35" "redis.auth.enabled: Feast takes the Redis password inside its connection string, COURIER_REDIS"
  "CKV_K8S_38" "chaos: the drill deletes serving pods through the Kubernetes API, so this pod alone mounts a token"
  "CKV_K8S_8" "tests: the helm test pod runs once to completion; probes do not apply"
  "CKV_K8S_9" "tests: the helm test pod runs once to completion; probes do not apply" }}
{{- $checks := list }}
{{- range .images }}
{{- if ne .pullPolicy "Always" }}{{ $checks = append $checks "CKV_K8S_15" }}{{ end }}
{{- if not .digest }}{{ $checks = append $checks "CKV_K8S_43" }}{{ end }}
{{- end }}
{{- if lt (int $v.podSecurityContext.runAsUser) 10000 }}{{ $checks = append $checks "CKV_K8S_40" }}{{ end }}
{{- if $v.redis.auth.enabled }}{{ $checks = append $checks "CKV_K8S_35" }}{{ end }}
{{- range $i, $id := concat (uniq $checks) (.extra | default list) }}
checkov.io/skip{{ add1 $i }}: {{ printf "%s=%s" $id (index $reasons $id) | quote }}
{{- end }}
{{- end }}
