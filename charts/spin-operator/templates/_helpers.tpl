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
RBAC rules for the watched namespaces: exactly the calls the operator makes (docs/design.md, "The
operator process"), measured by tests/charts/test_rbac.py, which runs the real operator against a
recording API server. Used by the ClusterRole in cluster-wide mode and by each Role in namespaced
mode. kopf's calls are list/watch (and event posts); every other call is the operator's own
client (spin_operator/kube.py).
*/}}
{{- define "spin-operator.namespacedRules" -}}
# SPINRuns: kopf lists and watches them; the operator patches metadata (its finalizer, on runs
# with retention Delete, and the applied-spec annotation).
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns"]
  verbs: ["list", "watch", "patch"]
# SPINRun status: phase, iterations, conditions.
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns/status"]
  verbs: ["patch"]
# Never called: every Job and Service the operator creates names its SPINRun as owner with
# blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission plugin (on in
# OpenShift, and in tests/cluster) admits only for users who may update the owner's finalizers.
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns/finalizers"]
  verbs: ["update"]
# The generation, training and evaluation Jobs: kopf watches them; the operator lists them once at
# start, creates them, reads one back (adoption after a conflict, or to confirm one is gone),
# patches spec.suspend and deletes them (run deletion, cleanup).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The headless Service of each multi-node training Job (torchrun rendezvous).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "delete"]
# Events on SPINRuns (posted through kopf); listed for a Job whose pods do not appear, to find
# the Job controller's FailedCreate (PodSecurity or a quota refusing the pods).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# Pods of a Job that waits to start, listed to say why (unschedulable, image pull back-off, a
# missing Secret key); never changed.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}

{{/*
Secrets: get only, to check that the credentials Secrets a SPINRun references exist (values never
pass through the operator: Jobs receive them through secretKeyRef). Granted per namespace only,
never cluster-wide (a cluster-wide get would read kube-system's Secrets too): in each watched
namespace in namespaced mode, in `rbac.secretCheckNamespaces` in cluster-wide mode. Elsewhere the
operator skips the check and a missing Secret shows as the pods' CreateContainerConfigError.
*/}}
{{- define "spin-operator.secretRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{/*
Cluster-scoped rules of both modes: kopf's resource observation lists and watches
CustomResourceDefinitions to notice when the SPINRun CRD changes (discovery itself, /apis, needs
no grant).
*/}}
{{- define "spin-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
Namespaced mode only: kopf's namespace observation lists and watches Namespaces to match
SPIN_NAMESPACES against the namespaces that exist (a cluster-wide operator watches every
namespace at once and does not need it).
*/}}
{{- define "spin-operator.namespacedModeClusterRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
