{{/*
The PodTemplateSpec of every meshd pod. The controller reads it from the ConfigMap
`<fullname>-meshd-pod-template` and makes each ServingRuntime a Deployment of it, adding the runtime's
resources, replicas, nodeSelector, tolerations and model formats. Pods of every runtime carry the same
name/instance/component labels, so they form one mesh behind one Service.

meshd reads every flag from DENSEMESH_<FLAG> (mesh/src/config.rs); only flags meshd has are set here.
*/}}
{{- define "densemesh.meshd.podTemplate" -}}
{{- $m := .Values.meshd -}}
{{- $tlsSecret := include "densemesh.etcd.tlsSecret" . -}}
{{- $metricsTls := and .Values.tls.secretName .Values.tls.metrics -}}
metadata:
  labels:
    {{- include "densemesh.selectorLabels" (dict "root" . "component" "meshd") | nindent 4 }}
    app.kubernetes.io/part-of: densemesh
    {{- with $m.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $m.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with include "densemesh.meshd.serviceAccountName" . }}
  serviceAccountName: {{ . }}
  {{- end }}
  # meshd never calls the Kubernetes API.
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ $m.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: meshd
      image: {{ include "densemesh.image" (dict "root" . "image" $m.image) | quote }}
      imagePullPolicy: {{ $m.image.pullPolicy }}
      args: [serve]
      ports:
        - name: grpc
          containerPort: 8033
          protocol: TCP
        - name: http
          containerPort: 8008
          protocol: TCP
        - name: metrics
          containerPort: 2112
          protocol: TCP
      env:
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: DENSEMESH_GRPC_ADDR
          value: {{ ternary "$(POD_IP):8033" "0.0.0.0:8033" $m.bindPodIP | quote }}
        # The endpoint the other pods reach this one at (meshd adds the port, and an IPv6 address's brackets).
        - name: DENSEMESH_ADVERTISE_ADDR
          value: "$(POD_IP)"
        # KServe V2 REST (--http-addr).
        - name: DENSEMESH_HTTP_ADDR
          value: "0.0.0.0:8008"
        - name: DENSEMESH_METRICS_ADDR
          value: "0.0.0.0:2112"
        - name: DENSEMESH_INSTANCE_ID
          value: "$(POD_NAME)"
        - name: DENSEMESH_ETCD
          value: {{ include "densemesh.etcd.endpoints" . | quote }}
        - name: DENSEMESH_ETCD_PREFIX
          value: {{ .Values.etcd.prefix | quote }}
        {{- if $tlsSecret }}
        - name: DENSEMESH_ETCD_TLS_DIR
          value: /etc/densemesh/etcd-tls
        {{- end }}
        {{- if .Values.adminToken.secretName }}
        - name: DENSEMESH_ADMIN_TOKEN_FILE
          value: /etc/densemesh/admin-token/token
        {{- end }}
        {{- if .Values.tls.secretName }}
        - name: DENSEMESH_TLS_DIR
          value: /etc/densemesh/tls
        # Pod IPs are in no certificate: peers are verified by the name the certificate holds.
        - name: DENSEMESH_TLS_PEER_NAME
          value: {{ default (include "densemesh.meshd.serviceHost" .) .Values.tls.peerName | quote }}
        {{- if .Values.tls.metrics }}
        - name: DENSEMESH_METRICS_TLS
          value: "true"
        {{- end }}
        {{- end }}
        - name: DENSEMESH_CAPACITY
          value: {{ $m.capacity | toString | quote }}
        - name: DENSEMESH_GPU_CAPACITY
          value: {{ $m.gpuCapacity | toString | quote }}
        # Registrations come from the controller through the management API; the repository is empty.
        - name: DENSEMESH_MODEL_REPO
          value: /models
        - name: DENSEMESH_CACHE_DIR
          value: /cache
        - name: DENSEMESH_DISK_CAPACITY
          value: {{ $m.diskCapacity | toString | quote }}
        {{- if $m.storageConfigSecret }}
        - name: DENSEMESH_STORAGE_CONFIG
          value: /storage-config
        {{- end }}
        - name: DENSEMESH_SHUTDOWN_GRACE
          value: {{ $m.shutdownGrace | quote }}
        {{- if $m.ortLibrary }}
        - name: DENSEMESH_ORT_LIBRARY
          value: {{ $m.ortLibrary | quote }}
        {{- end }}
        {{- with $m.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
          {{- if $metricsTls }}
          scheme: HTTPS
          {{- end }}
        periodSeconds: 5
        failureThreshold: 2
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
          {{- if $metricsTls }}
          scheme: HTTPS
          {{- end }}
        initialDelaySeconds: 10
        periodSeconds: 10
        failureThreshold: 3
      {{- with $m.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: models
          mountPath: /models
        - name: cache
          mountPath: /cache
        - name: tmp
          mountPath: /tmp
        {{- if $m.storageConfigSecret }}
        - name: storage-config
          mountPath: /storage-config
          readOnly: true
        {{- end }}
        {{- if $tlsSecret }}
        - name: etcd-tls
          mountPath: /etc/densemesh/etcd-tls
          readOnly: true
        {{- end }}
        {{- if .Values.adminToken.secretName }}
        - name: admin-token
          mountPath: /etc/densemesh/admin-token
          readOnly: true
        {{- end }}
        {{- if .Values.tls.secretName }}
        - name: tls
          mountPath: /etc/densemesh/tls
          readOnly: true
        {{- end }}
  volumes:
    - name: models
      emptyDir: {}
    - name: cache
      emptyDir:
        sizeLimit: {{ include "densemesh.quantity" $m.diskCapacity | quote }}
    - name: tmp
      emptyDir: {}
    {{- if $m.storageConfigSecret }}
    - name: storage-config
      secret:
        secretName: {{ $m.storageConfigSecret }}
        # As modelmesh-serving: pods start without it; meshd re-reads it once it appears.
        optional: true
    {{- end }}
    {{- if $tlsSecret }}
    - name: etcd-tls
      secret:
        secretName: {{ $tlsSecret }}
    {{- end }}
    {{- if .Values.adminToken.secretName }}
    - name: admin-token
      secret:
        secretName: {{ .Values.adminToken.secretName }}
    {{- end }}
    {{- if .Values.tls.secretName }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.secretName }}
    {{- end }}
  {{- with $m.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* meshd's byte sizes (2GiB, 500MB, 1048576) as a Kubernetes quantity (2Gi, 500M, 1048576). */}}
{{- define "densemesh.quantity" -}}
{{- $s := . | toString | nospace }}
{{- if regexMatch "(?i)^[0-9]+[kmgt]ib$" $s }}
{{- printf "%s%si" (regexFind "^[0-9]+" $s) (regexFind "(?i)[kmgt]" $s | upper) }}
{{- else if regexMatch "(?i)^[0-9]+[kmgt]b$" $s }}
{{- printf "%s%s" (regexFind "^[0-9]+" $s) (regexFind "(?i)[kmgt]" $s | upper | replace "K" "k") }}
{{- else }}
{{- regexFind "^[0-9]+" $s }}
{{- end }}
{{- end }}
