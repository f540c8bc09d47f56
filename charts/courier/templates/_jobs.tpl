{{/* Pieces shared by the jobs-image workloads (Feast, training, Locust, chaos, helm test). */}}

{{/*
A jobs-image container: (dict "ctx" $ "name" "apply" "resources" $res), plus optional "env" (a list)
and "noData" (true for pods that do not need the shared volume: Locust, chaos, the helm test).
*/}}
{{- define "courier.jobContainerBase" -}}
name: {{ .name }}
image: {{ include "courier.jobsImage" .ctx }}
imagePullPolicy: {{ .ctx.Values.images.jobs.pullPolicy }}
workingDir: /app
securityContext:
  {{- include "courier.containerSecurityContext" .ctx | nindent 2 }}
resources:
  {{- toYaml .resources | nindent 2 }}
env:
  {{- include "courier.commonEnv" .ctx | nindent 2 }}
  {{- with .env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  {{- if not .noData }}
  - name: data
    mountPath: {{ include "courier.dataDir" .ctx }}
  {{- end }}
  - name: tmp
    mountPath: /tmp
{{- end }}

{{/* Pod-level settings of a jobs-image pod that needs no Kubernetes API access: (dict "ctx" $ "noData" bool). */}}
{{- define "courier.jobPodBase" -}}
serviceAccountName: {{ include "courier.serviceAccountName" .ctx }}
automountServiceAccountToken: false
securityContext:
  {{- include "courier.podSecurityContext" .ctx | nindent 2 }}
{{- include "courier.imagePullSecrets" (dict "ctx" .ctx "indent" 0) }}
volumes:
  {{- if not .noData }}
  {{- include "courier.dataVolume" .ctx | nindent 2 }}
  {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: 1Gi
{{- end }}

{{/* Init container of the data jobs: creates the folders the images' links point into. */}}
{{- define "courier.prepareContainer" -}}
{{- $d := include "courier.dataDir" . }}
{{- include "courier.jobContainerBase" (dict "ctx" . "name" "prepare" "resources" (include "courier.tinyResources" . | fromYaml)) }}
command: ["mkdir", "-p", "{{ $d }}/offline", "{{ $d }}/feast", "{{ $d }}/artifacts", "{{ $d }}/reports"]
{{- end }}

{{/* Init container that waits for the Feast bootstrap (the city on the volume and the registry). */}}
{{- define "courier.waitForFeatures" -}}
{{- $d := include "courier.dataDir" . }}
{{- include "courier.jobContainerBase" (dict "ctx" . "name" "wait-for-features" "resources" (include "courier.tinyResources" . | fromYaml)) }}
command: ["/bin/sh", "-c"]
args:
  - |
    until [ -f {{ $d }}/offline/simulation.json ] && [ -f {{ $d }}/feast/registry.db ]; do
      echo "waiting for the Feast bootstrap job (data and registry)"; sleep 10
    done
{{- end }}

{{/* Resources of the small wait and prepare init containers. */}}
{{- define "courier.tinyResources" -}}
requests: {cpu: 10m, memory: 32Mi}
limits: {cpu: 100m, memory: 64Mi}
{{- end }}
