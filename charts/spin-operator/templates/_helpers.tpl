{{/*
Names, labels and the RBAC rules shared by the cluster-wide and the namespaced mode.
*/}}

{{- define "spin-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
Truncated to 63 characters (object names are used as label values).
*/}}
{{- define "spin-operator.fullname" -}}
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

{{/*
Name of cluster-scoped objects (ClusterRole, ClusterRoleBinding): prefixed with the release
namespace, so that two releases with the same name in different namespaces do not collide.
*/}}
{{- define "spin-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "spin-operator.fullname" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "spin-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spin-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spin-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spin-operator.labels" -}}
helm.sh/chart: {{ include "spin-operator.chart" . }}
{{ include "spin-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: spin-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "spin-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spin-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest wins, the tag defaults to appVersion.
Usage: include "spin-operator.image" (dict "image" .Values.image "root" .)
*/}}
{{- define "spin-operator.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
RBAC rules for the watched namespaces: exactly the calls in docs/design.md, "The operator
process". Used by the ClusterRole in cluster-wide mode and by each Role in namespaced mode.
tests/charts/test_rbac.py checks them against the requests of the real operator.
*/}}
{{- define "spin-operator.namespacedRules" -}}
# SPINRuns: kopf lists and watches them, patches finalizers and its progress annotations,
# and the operator reads one object back after a conflict.
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns"]
  verbs: ["get", "list", "watch", "patch"]
# SPINRun status: the reconciler's phase, iterations and conditions.
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns/status"]
  verbs: ["get", "patch"]
# The generation, training and evaluation Jobs; patch suspends/resumes them.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The headless Service of each multi-node training Job (torchrun rendezvous).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "create", "delete"]
# Secrets: get only, to check that referenced credentials Secrets exist (values are never read
# into the operator; Jobs receive them through secretKeyRef).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events on SPINRuns (kopf's and the operator's own).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
Cluster-scoped rules. CRDs: kopf's resource discovery watches CustomResourceDefinitions to
notice when the SPINRun CRD changes. Namespaces: see clusterwideOnlyRules.
*/}}
{{- define "spin-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "spin-operator.clusterwideOnlyRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
