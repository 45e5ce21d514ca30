{{/*
The library-style part of the chart: what an application's own chart includes to run the
sidecar in its pods. With this chart as a dependency (alias llmSidecar, demo.enabled: false):

  {{- $sc := dict "Values" .Values.llmSidecar "Release" .Release }}
  template:
    metadata:
      labels:      {{- include "llm-sidecar.podLabels" $sc | nindent 8 }}
      annotations: {{- include "llm-sidecar.podAnnotations" $sc | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ include "llm-sidecar.terminationGracePeriodSeconds" $sc }}
      {{- with include "llm-sidecar.initContainers" $sc }}
      initContainers: {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: app ...            # calls http://127.0.0.1:8080 instead of the provider
        {{- include "llm-sidecar.containers" $sc | nindent 8 }}
      volumes: {{- include "llm-sidecar.volumes" $sc | nindent 8 }}

initContainers renders the sidecar in native mode and nothing in classic mode;
containers the other way round. The dependency itself renders the ConfigMap, Secret,
metrics Service and Prometheus objects the pod refers to.
*/}}

{{- define "llm-sidecar.configDir" -}}/etc/llm-sidecar{{- end }}
{{- define "llm-sidecar.configFile" -}}/etc/llm-sidecar/sidecar.yaml{{- end }}
{{- define "llm-sidecar.secretDir" -}}/var/run/llm-sidecar/secret{{- end }}

{{/* The sidecar's config file, from .Values.config plus what the chart owns (see values.yaml). */}}
{{- define "llm-sidecar.configYaml" -}}
{{- $v := .Values }}
{{- $cfg := deepCopy ($v.config | default dict) }}
{{- $_ := set $cfg "version" "sidecar/v1" }}
{{- $_ := set $cfg "listen" (printf "%s:%d" $v.proxy.listenAddress (int $v.ports.proxy)) }}
{{- $admin := deepCopy (get $cfg "admin" | default dict) }}
{{- $_ := set $admin "listen" (printf "0.0.0.0:%d" (int $v.ports.admin)) }}
{{- if $v.secret.adminTokenKey }}
{{- $_ := set $admin "token_file" (printf "%s/admin-token" (include "llm-sidecar.secretDir" .)) }}
{{- end }}
{{- $_ := set $cfg "admin" $admin }}
{{- if not (get $cfg "upstreams") }}
{{- if and $v.demo.enabled $v.demo.mockUpstream }}
{{- $mock := printf "http://127.0.0.1:%d" (int $v.demo.mockUpstreamPort) }}
{{- $_ := set $cfg "upstreams" (list
      (dict "name" "openai" "url" (printf "%s/openai" $mock) "provider" "openai" "mount" "/")
      (dict "name" "anthropic" "url" (printf "%s/anthropic" $mock) "provider" "anthropic" "mount" "/anthropic")) }}
{{- else }}
{{- fail "llm-sidecar: config.upstreams is required (only the demo with demo.mockUpstream fills it in)" }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "data_dir" $v.dataDir }}
{{- $shutdown := deepCopy (get $cfg "shutdown" | default dict) }}
{{- $_ := set $shutdown "drain_timeout" (printf "%ds" (int $v.shutdown.drainTimeoutSeconds)) }}
{{- $_ := set $cfg "shutdown" $shutdown }}
{{- if $v.prices }}
{{- $_ := set $cfg "pricing" (dict "file" (printf "%s/prices.yaml" (include "llm-sidecar.configDir" .))) }}
{{- end }}
{{- if $v.rules }}
{{- $rules := deepCopy (get $cfg "rules" | default dict) }}
{{- $_ := set $rules "files" (list (printf "%s/rules" (include "llm-sidecar.configDir" .))) }}
{{- $_ := set $cfg "rules" $rules }}
{{- end }}
{{- if $v.prometheusRule.enabled }}
{{- $notify := deepCopy (get $cfg "notify" | default dict) }}
{{- $_ := set $notify "enabled" false }}
{{- $_ := set $cfg "notify" $notify }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The data of the sidecar's ConfigMap (also hashed into the pods' checksum annotation). */}}
{{- define "llm-sidecar.configMapData" -}}
{{- $data := dict "sidecar.yaml" (include "llm-sidecar.configYaml" . | printf "%s\n") }}
{{- with .Values.prices }}
{{- $_ := set $data "prices.yaml" (printf "%s\n" (trimSuffix "\n" .)) }}
{{- end }}
{{- range $name, $text := .Values.rules }}
{{- $_ := set $data (printf "rules.%s" $name) (printf "%s\n" (trimSuffix "\n" $text)) }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{- define "llm-sidecar.secretData" -}}
{{- range $key, $value := .Values.secret.data }}
{{ $key }}: {{ $value | toString | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Pod labels: the instance label the metrics Service and the PodMonitor select on. */}}
{{- define "llm-sidecar.podLabels" -}}
{{- include "llm-sidecar.instanceLabel" . }}
{{- end }}

{{/* Pod annotations: a change of the rendered config, prices, rules or created Secret rolls the pods. */}}
{{- define "llm-sidecar.podAnnotations" -}}
{{- $annotations := dict }}
{{- if not .Values.existingConfigMap }}
{{- $_ := set $annotations "checksum/llm-sidecar-config" (include "llm-sidecar.configMapData" . | sha256sum) }}
{{- end }}
{{- if and .Values.secret.create (not .Values.secret.existingSecret) }}
{{- $_ := set $annotations "checksum/llm-sidecar-secret" (include "llm-sidecar.secretData" . | sha256sum) }}
{{- end }}
{{- if $annotations }}
{{- toYaml $annotations }}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds the pod needs so that the sidecar can drain its streams. */}}
{{- define "llm-sidecar.terminationGracePeriodSeconds" -}}
{{- $classic := ternary (int .Values.classic.preStopSleepSeconds) 0 (eq .Values.mode "classic") }}
{{- add (int .Values.shutdown.drainTimeoutSeconds) (int .Values.shutdown.graceMarginSeconds) $classic }}
{{- end }}

{{/* The sidecar container, as one list item. */}}
{{- define "llm-sidecar.container" -}}
{{- $v := .Values -}}
{{- $admin := int $v.ports.admin -}}
- name: llm-sidecar
  image: {{ include "llm-sidecar.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if eq $v.mode "native" }}
  restartPolicy: Always
  {{- end }}
  args:
    - --config
    - {{ include "llm-sidecar.configFile" . }}
    - --listen
    - {{ printf "%s:%d" $v.proxy.listenAddress (int $v.ports.proxy) | quote }}
    - --admin-listen
    - {{ printf "0.0.0.0:%d" $admin | quote }}
    - --data-dir
    - {{ $v.dataDir }}
    - --log-level
    - {{ $v.logLevel }}
    {{- range $v.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: llm-proxy
      containerPort: {{ int $v.ports.proxy }}
      protocol: TCP
    - name: llm-metrics
      containerPort: {{ $admin }}
      protocol: TCP
  {{- $secret := include "llm-sidecar.secretName" . }}
  {{- if $secret }}
  envFrom:
    - secretRef:
        name: {{ $secret }}
  {{- end }}
  {{- if or $v.otlp.endpoint $v.extraEnv }}
  env:
    {{- if $v.otlp.endpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ $v.otlp.endpoint | quote }}
    - name: OTEL_EXPORTER_OTLP_PROTOCOL
      value: {{ $v.otlp.protocol | quote }}
    - name: OTEL_SERVICE_NAME
      value: {{ include "llm-sidecar.fullname" . | quote }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  startupProbe:
    httpGet:
      path: /readyz
      port: {{ $admin }}
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
    timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $admin }}
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
    timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $admin }}
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
    timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
  {{- if eq $v.mode "classic" }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ int $v.classic.preStopSleepSeconds }}"]
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: llm-sidecar-config
      mountPath: {{ include "llm-sidecar.configDir" . }}
      readOnly: true
    {{- if $v.secret.adminTokenKey }}
    - name: llm-sidecar-secret
      mountPath: {{ include "llm-sidecar.secretDir" . }}
      readOnly: true
    {{- end }}
    - name: llm-sidecar-data
      mountPath: {{ $v.dataDir }}
    - name: llm-sidecar-tmp
      mountPath: /tmp
{{- end }}

{{/* The sidecar as an init container item in native mode; empty in classic mode. */}}
{{- define "llm-sidecar.initContainers" -}}
{{- if eq .Values.mode "native" }}{{ include "llm-sidecar.container" . }}{{ end }}
{{- end }}

{{/* The sidecar as a container item in classic mode; empty in native mode. */}}
{{- define "llm-sidecar.containers" -}}
{{- if eq .Values.mode "classic" }}{{ include "llm-sidecar.container" . }}{{ end }}
{{- end }}

{{/* The pod volumes the sidecar mounts, as list items. */}}
{{- define "llm-sidecar.volumes" -}}
- name: llm-sidecar-config
  configMap:
    name: {{ include "llm-sidecar.configMapName" . }}
    {{- if not .Values.existingConfigMap }}
    items:
      - key: sidecar.yaml
        path: sidecar.yaml
      {{- if .Values.prices }}
      - key: prices.yaml
        path: prices.yaml
      {{- end }}
      {{- range $name, $_ := .Values.rules }}
      - key: rules.{{ $name }}
        path: rules/{{ $name }}
      {{- end }}
    {{- end }}
{{- if .Values.secret.adminTokenKey }}
- name: llm-sidecar-secret
  secret:
    secretName: {{ include "llm-sidecar.secretName" . }}
    items:
      - key: {{ .Values.secret.adminTokenKey }}
        path: admin-token
{{- end }}
- name: llm-sidecar-data
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "llm-sidecar.claimName" . }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.persistence.emptyDirSizeLimit }}
  {{- end }}
- name: llm-sidecar-tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{/* The metrics port of an application's own Service, as a list item (optional). */}}
{{- define "llm-sidecar.servicePort" -}}
- name: llm-metrics
  port: {{ int .Values.ports.admin }}
  targetPort: {{ int .Values.ports.admin }}
  protocol: TCP
{{- end }}
