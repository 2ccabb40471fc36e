{{/* Names: the release's fullname, then -authz, -extproc, ... for each component. */}}
{{- define "atlas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "atlas.fullname" -}}
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

{{/* In-cluster DNS name of one of this release's Services: (list $ "authz"). */}}
{{- define "atlas.host" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s.%s.svc.%s" (include "atlas.fullname" $root) (index . 1) $root.Release.Namespace $root.Values.clusterDomain }}
{{- end }}

{{- define "atlas.upstreamHost" -}}
{{- printf "%s.%s.svc.%s" .Values.upstream.service .Values.upstream.namespace .Values.clusterDomain }}
{{- end }}

{{/* Labels of a component's resources: (list $ "authz"). */}}
{{- define "atlas.labels" -}}
{{- $root := index . 0 }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: atlas
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
{{ include "atlas.selectorLabels" . }}
{{- end }}

{{/* What a component's Services, PDB and Deployment select on: (list $ "authz"). */}}
{{- define "atlas.selectorLabels" -}}
{{- $root := index . 0 }}
app.kubernetes.io/name: {{ include "atlas.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "atlas.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "atlas.configName" -}}{{ include "atlas.fullname" . }}-config{{- end }}

{{/* The Secret with ATLAS_ADMIN_TOKEN, ATLAS_REDIS_URL (optional ATLAS_UPSTREAM_API_KEY). */}}
{{- define "atlas.secretName" -}}
{{- default (printf "%s-secrets" (include "atlas.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "atlas.providerSecretName" -}}
{{- default (printf "%s-provider-credentials" (include "atlas.fullname" .)) .Values.providers.existingSecret }}
{{- end }}

{{/* True (non-empty) when authz gets provider credentials from a Secret. */}}
{{- define "atlas.hasProviderSecret" -}}
{{- if or .Values.providers.existingSecret .Values.providers.credentials }}true{{ end }}
{{- end }}

{{/* Standalone Envoy only without a mesh: Istio's or Envoy Gateway's Envoys replace it. */}}
{{- define "atlas.standaloneEnvoy" -}}
{{- if eq .Values.mesh.mode "none" }}true{{ end }}
{{- end }}

{{/* ATLAS_REDIS_URL for the three services: the trial Valkey's Service, or the Secret. */}}
{{- define "atlas.redisEnv" -}}
{{- if .Values.valkey.enabled }}
- name: ATLAS_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "atlas.host" (list . "valkey")) | quote }}
{{- else }}
{{- if not (or .Values.redis.url .Values.secrets.existingSecret) }}
{{- fail "redis: set redis.url (or secrets.existingSecret with key ATLAS_REDIS_URL), or valkey.enabled=true for a trial" }}
{{- end }}
- name: ATLAS_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ include "atlas.secretName" . }}, key: ATLAS_REDIS_URL}
{{- end }}
{{- end }}

{{/* Pod-level settings every Atlas service shares (deploy/k8s/base). */}}
{{- define "atlas.podCommon" -}}
{{- $root := index . 0 }}
{{- $c := index . 2 }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels: {{- include "atlas.selectorLabels" (list $root (index . 1)) | nindent 8 }}
{{- with $c.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "atlas.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{- define "atlas.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end }}

{{/* HPA for a component: (list $ "authz" .Values.authz). */}}
{{- define "atlas.hpa" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $c := index . 2 }}
{{- if $c.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "atlas.fullname" $root }}-{{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels: {{- include "atlas.labels" (list $root $name) | nindent 4 }}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: {{ include "atlas.fullname" $root }}-{{ $name }}}
  minReplicas: {{ $c.autoscaling.minReplicas }}
  maxReplicas: {{ $c.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target: {type: Utilization, averageUtilization: {{ $c.autoscaling.targetCPUUtilizationPercentage }}}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: {{ $c.autoscaling.scaleDownStabilizationSeconds }}
{{- end }}
{{- end }}

{{/* PDB for a component: (list $ "authz" .Values.authz). */}}
{{- define "atlas.pdb" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $c := index . 2 }}
{{- if $c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "atlas.fullname" $root }}-{{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels: {{- include "atlas.labels" (list $root $name) | nindent 4 }}
spec:
  minAvailable: {{ $c.pdb.minAvailable }}
  selector:
    matchLabels: {{- include "atlas.selectorLabels" (list $root $name) | nindent 6 }}
{{- end }}
{{- end }}

{{/* replicas unless an HPA owns it (so an upgrade does not reset a scaled-out Deployment). */}}
{{- define "atlas.replicas" -}}
{{- if not .autoscaling.enabled }}
replicas: {{ .replicas }}
{{- end }}
{{- end }}
