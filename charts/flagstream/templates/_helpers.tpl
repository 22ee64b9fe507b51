{{/* Names, labels and the pieces both workloads share. */}}

{{- define "flagstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name; the component suffixes ("-write-headless") fit in 63. */}}
{{- define "flagstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "flagstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flagstream.writeName" -}}{{ include "flagstream.fullname" . }}-write{{- end -}}
{{- define "flagstream.readName" -}}{{ include "flagstream.fullname" . }}-read{{- end -}}
{{- /* "-read-tier2-headless" is 20 characters: the prefix gives up 3 of its 46 so the name fits in 63. */ -}}
{{- define "flagstream.readTier2Name" -}}{{ include "flagstream.fullname" . | trunc 43 | trimSuffix "-" }}-read-tier2{{- end -}}
{{- define "flagstream.secretName" -}}
{{- default (printf "%s-tokens" (include "flagstream.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "flagstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flagstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "flagwrite"). */}}
{{- define "flagstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flagstream.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* The recommended labels, from this one helper; same call as selectorLabels. */}}
{{- define "flagstream.labels" -}}
{{ include "flagstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: flagstream
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "flagstream.chart" .ctx }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations (at indent 2) from commonAnnotations plus an optional dict; nothing when both are empty. */}}
{{- define "flagstream.annotations" -}}
{{- $all := merge (dict) (.extra | default (dict)) .ctx.Values.commonAnnotations -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "flagstream.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The tokens Secret's data, generated once: an existing Secret's values win over new random ones. */}}
{{- define "flagstream.tokenSecrets" -}}
{{- /* Generated once per render and kept on .Values, so the Secret and the checksum see the same. */ -}}
{{- if not (hasKey .Values.auth "generatedThisRender") -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "flagstream.secretName" .)) | default (dict) -}}
{{- $data := $existing.data | default (dict) -}}
{{- $keys := .Values.auth.secretKeys -}}
{{- $out := dict -}}
{{- $roles := dict "admin" $keys.adminToken "sync" $keys.syncToken "eval" $keys.evalToken -}}
{{- if .Values.flagread.tier2.enabled -}}
{{- $_ := set $roles "tier2Sync" $keys.tier2SyncToken -}}
{{- end -}}
{{- range $role, $key := $roles -}}
{{- $given := index $.Values.auth.tokens $role -}}
{{- if $given -}}
{{- $_ := set $out $role $given -}}
{{- else if hasKey $data $key -}}
{{- $_ := set $out $role (index $data $key | b64dec) -}}
{{- else -}}
{{- $_ := set $out $role (randAlphaNum 40) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values.auth "generatedThisRender" $out -}}
{{- end -}}
{{- toJson .Values.auth.generatedThisRender -}}
{{- end -}}

{{/* The writer's address as flagread follows it. */}}
{{- define "flagstream.upstream" -}}
{{- if .Values.flagread.upstream -}}
{{ .Values.flagread.upstream }}
{{- else -}}
{{ ternary "https" "http" .Values.flagwrite.tls.enabled }}://{{ include "flagstream.writeName" . }}:{{ .Values.flagwrite.ports.grpc }}
{{- end -}}
{{- end -}}

{{/*
The settings of one tier of flagread, as JSON (read with fromJson). Tier 1 follows the
writer (or flagread.upstream) and, with flagread.tier2.enabled, serves replication to
tier 2; tier 2 follows tier 1's Service (or flagread.tier2.upstream). Tier 2 takes
tier 1's value of every placement and scaling key it leaves empty; the autoscaling and
pdb maps key by key. Call with (dict "ctx" $ "tier" 1).
*/}}
{{- define "flagstream.readTier" -}}
{{- $v := .ctx.Values -}}
{{- $r := $v.flagread -}}
{{- $t2 := $r.tier2 -}}
{{- $keys := list "replicaCount" "resources" "nodeSelector" "affinity" "tolerations" "topologySpreadConstraints" "priorityClassName" "podLabels" "podAnnotations" -}}
{{- $out := dict "tier" (int .tier) "autoscaling" (deepCopy $r.autoscaling) "pdb" (deepCopy $r.pdb) "service" $r.service -}}
{{- range $keys -}}
{{- $_ := set $out . (index $r .) -}}
{{- end -}}
{{- if eq (int .tier) 1 -}}
{{- $upstream := include "flagstream.upstream" .ctx -}}
{{- $_ := merge $out (dict
  "name" (include "flagstream.readName" .ctx)
  "component" "flagread"
  "upstream" $upstream
  "upstreamTLS" (or $v.flagwrite.tls.enabled (hasPrefix "https://" $upstream))
  "upstreamCASecret" ($r.upstreamTLS.caSecretName | default $v.flagwrite.tls.secretName)
  "upstreamCAKey" $r.upstreamTLS.caKey
  "upstreamClientCert" $r.upstreamTLS.clientCertSecretName
  "upstreamDomain" (ternary ($v.flagwrite.tls.serverName | default (include "flagstream.writeName" .ctx)) "" $v.flagwrite.tls.enabled)
  "syncTokenKey" $v.auth.secretKeys.syncToken
  "serveReplication" $t2.enabled
  "tlsSecretName" $r.tls.secretName
  "tlsServerName" ($r.tls.serverName | default (include "flagstream.readName" .ctx))) -}}
{{- else -}}
{{- range $keys -}}
{{- $given := index $t2 . -}}
{{- if $given -}}
{{- $_ := set $out . $given -}}
{{- end -}}
{{- end -}}
{{- range $k, $x := $t2.autoscaling -}}
{{- $_ := set $out.autoscaling $k $x -}}
{{- end -}}
{{- range $k, $x := $t2.pdb -}}
{{- $_ := set $out.pdb $k $x -}}
{{- end -}}
{{- $_ := set $out "service" (dict "type" ($t2.service.type | default $r.service.type) "annotations" ($t2.service.annotations | default $r.service.annotations)) -}}
{{- /* Tier 1's own address, over TLS when tier 1 serves TLS. */ -}}
{{- $upstream := $t2.upstream | default (printf "%s://%s:%v" (ternary "https" "http" $r.tls.enabled) (include "flagstream.readName" .ctx) $r.ports.grpc) -}}
{{- $tls := $t2.tls -}}
{{- $_ := merge $out (dict
  "name" (include "flagstream.readTier2Name" .ctx)
  "component" "flagread-tier2"
  "upstream" $upstream
  "upstreamTLS" (hasPrefix "https://" $upstream)
  "upstreamCASecret" ($t2.upstreamTLS.caSecretName | default $r.tls.secretName)
  "upstreamCAKey" $t2.upstreamTLS.caKey
  "upstreamClientCert" $t2.upstreamTLS.clientCertSecretName
  "upstreamDomain" (ternary ($r.tls.serverName | default (include "flagstream.readName" .ctx)) "" (and $r.tls.enabled (not $t2.upstream)))
  "syncTokenKey" $v.auth.secretKeys.tier2SyncToken
  "serveReplication" false
  "tlsSecretName" ($tls.secretName | default $r.tls.secretName)
  "tlsServerName" ($tls.serverName | default (ternary (include "flagstream.readTier2Name" .ctx) ($r.tls.serverName | default (include "flagstream.readName" .ctx)) (not (empty $tls.secretName))))) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
A probe: native gRPC on the numeric port, or, with TLS on the serving port, the image's
healthcheck subcommand: the kubelet's gRPC probe speaks plain text only before Kubernetes
1.37, and never presents a client certificate (mTLS).
Call with (dict "kubeVersion" $.Capabilities.KubeVersion.Version "binary" "flagread" "port" 50052
"service" "" "tls" .tls "serverName" "x" "probe" .probe).
*/}}
{{- define "flagstream.probe" -}}
{{- $mtls := and .tls.clientCA .tls.clientCA.enabled -}}
{{- if and .tls.enabled (or $mtls (semverCompare "<1.37.0-0" .kubeVersion)) }}
exec:
  command:
    - /usr/local/bin/{{ .binary }}
    - healthcheck
    - --addr
    - 127.0.0.1:{{ .port }}
    - --service
    - {{ .service | quote }}
    - --tls-ca
    - /etc/flagstream/tls/ca.crt
    - --tls-domain
    - {{ .serverName }}
    {{- if $mtls }}
    - --tls-cert
    - /etc/flagstream/tls/tls.crt
    - --tls-key
    - /etc/flagstream/tls/tls.key
    {{- end }}
    - --timeout-ms
    - {{ mul .probe.timeoutSeconds 1000 | quote }}
{{- else }}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
  {{- if .tls.enabled }}
  # Kubernetes 1.37+: the kubelet speaks TLS (without verifying the certificate).
  mode: TLS
  {{- end }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end -}}

{{/* prometheus.io annotations when scraping by annotation. */}}
{{- define "flagstream.scrapeAnnotations" -}}
{{- if and .ctx.Values.metrics.scrapeAnnotations (not .ctx.Values.metrics.serviceMonitor.enabled) (not .ctx.Values.metrics.podMonitor.enabled) }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Checks of combinations the schema cannot express. */}}
{{- define "flagstream.validate" -}}
{{- if and .Values.flagwrite.tls.enabled (not .Values.flagwrite.tls.secretName) -}}
{{- fail "flagwrite.tls.enabled needs flagwrite.tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.flagread.tls.enabled (not .Values.flagread.tls.secretName) -}}
{{- fail "flagread.tls.enabled needs flagread.tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.flagwrite.tls.clientCA.enabled (not .Values.flagwrite.tls.enabled) -}}
{{- fail "flagwrite.tls.clientCA.enabled needs flagwrite.tls.enabled" -}}
{{- end -}}
{{- if and .Values.flagwrite.tls.clientCA.enabled (not .Values.flagread.upstreamTLS.clientCertSecretName) -}}
{{- fail "flagwrite.tls.clientCA.enabled needs flagread.upstreamTLS.clientCertSecretName: replicas must present a certificate to follow the writer" -}}
{{- end -}}
{{- if and .Values.flagread.tls.clientCA.enabled (not .Values.flagread.tls.enabled) -}}
{{- fail "flagread.tls.clientCA.enabled needs flagread.tls.enabled" -}}
{{- end -}}
{{- if and .Values.flagwrite.persistence.existingClaim (not .Values.flagwrite.persistence.enabled) -}}
{{- fail "flagwrite.persistence.existingClaim needs flagwrite.persistence.enabled" -}}
{{- end -}}
{{- range $c := list "flagwrite" "flagread" -}}
{{- $ports := index $.Values $c "ports" -}}
{{- if ne (len (values $ports | uniq)) (len $ports) -}}
{{- fail (printf "%s.ports must be distinct, got %s" $c (toJson $ports)) -}}
{{- end -}}
{{- end -}}
{{- with .Values.flagread.tier2 -}}
{{- if .enabled -}}
{{- if and $.Values.flagread.tls.clientCA.enabled (hasPrefix "https://" (include "flagstream.readTier" (dict "ctx" $ "tier" 2) | fromJson).upstream) (not .upstreamTLS.clientCertSecretName) -}}
{{- fail "flagread.tier2 follows tier 1, which requires client certificates (flagread.tls.clientCA.enabled): set flagread.tier2.upstreamTLS.clientCertSecretName" -}}
{{- end -}}
{{- if and (hasPrefix "https://" (include "flagstream.readTier" (dict "ctx" $ "tier" 2) | fromJson).upstream) (not .upstreamTLS.caSecretName) (not $.Values.flagread.tls.secretName) -}}
{{- fail "flagread.tier2 follows an https upstream: set flagread.tier2.upstreamTLS.caSecretName (the CA of its certificate)" -}}
{{- end -}}
{{- if and .tls.secretName (not $.Values.flagread.tls.enabled) -}}
{{- fail "flagread.tier2.tls.secretName needs flagread.tls.enabled (tier 2 serves TLS exactly when tier 1 does)" -}}
{{- end -}}
{{- $t := $.Values.auth.tokens -}}
{{- if and $t.tier2Sync (or (eq $t.tier2Sync $t.sync) (eq $t.tier2Sync $t.eval)) -}}
{{- fail "auth.tokens.tier2Sync must differ from auth.tokens.sync and auth.tokens.eval (a tier-2 token must not follow the writer, and a tokens file holds each secret once)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics.serviceMonitor and metrics.podMonitor would scrape every pod twice: enable one" -}}
{{- end -}}
{{- end -}}

{{/* Rolls the pods when chart-made secrets or settings they read at start change. */}}
{{- define "flagstream.checksum" -}}
{{- $a := .Values.auth -}}
{{- /* Tier 2's key counts only with tier 2, so turning it off leaves the pods as they were. */ -}}
{{- $secretKeys := ternary $a.secretKeys (omit $a.secretKeys "tier2SyncToken") .Values.flagread.tier2.enabled -}}
{{- $in := dict "existingSecret" $a.existingSecret "secretKeys" $secretKeys "devNoAuth" $a.devNoAuth "extraFlagwriteTokens" $a.extraFlagwriteTokens "extraFlagreadTokens" $a.extraFlagreadTokens "flagwriteTls" .Values.flagwrite.tls "flagreadTls" .Values.flagread.tls "upstreamTls" .Values.flagread.upstreamTLS -}}
{{- if and (not $a.existingSecret) (not $a.devNoAuth) -}}
{{- $_ := set $in "tokens" (include "flagstream.tokenSecrets" . | fromJson) -}}
{{- end -}}
{{- toJson $in | sha256sum -}}
{{- end -}}
