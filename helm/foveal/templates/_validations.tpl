{{/*
Checks the schema cannot express (values.schema.json handles types, ranges and typos).
Each failure names the value to change. Called once from configmap.yaml.
*/}}
{{- define "foveal.validate" -}}
{{- $cfg := .Values.config | default dict }}
{{- range $edge := list "gateway" "grpc" }}
{{- $section := get $cfg $edge | default dict }}
{{- if or (hasKey $section "port") (hasKey $section "host") }}
{{- fail (printf "config.%s.host/port are set by the chart (router.%s, bind address 0.0.0.0): remove them from config" $edge (ternary "httpPort" "grpcPort" (eq $edge "gateway"))) }}
{{- end }}
{{- end }}
{{- if eq (int .Values.router.httpPort) (int .Values.router.grpcPort) }}
{{- fail (printf "router.httpPort and router.grpcPort are both %d: the gateway and the gRPC router need two ports" (int .Values.router.httpPort)) }}
{{- end }}
{{- $storeUrl := (get ($cfg.store | default dict) "url") | default "sqlite:///foveal.db" }}
{{- if and (gt (int .Values.router.replicas) 1) (not .Values.router.storeUrlSecret.name) (hasPrefix "sqlite" $storeUrl) }}
{{- fail (printf "router.replicas is %d but the store is SQLite (%s), a file inside each pod: several routers would each keep their own decisions, feedback and learned state. Use PostgreSQL (config.store.url or router.storeUrlSecret) or router.replicas: 1" (int .Values.router.replicas) $storeUrl) }}
{{- end }}
{{- $warm := 0 }}
{{- $enabled := 0 }}
{{- range $tier, $raw := .Values.pools }}
{{- $p := include "foveal.poolValues" (dict "ctx" $ "pool" $raw) | fromYaml }}
{{- if ne (toString (get $p "enabled")) "false" }}
{{- $enabled = add1 $enabled }}
{{- if gt (int $p.minReplicas) 0 }}{{ $warm = add1 $warm }}{{ end }}
{{- end }}
{{- end }}
{{- if and (gt $enabled 0) (eq $warm 0) (eq (toString (get ($cfg.catalog | default dict) "source")) "kubernetes") }}
{{- fail "every pool has minReplicas 0: the router reports not ready (/readyz) while no tier has a ready replica, so no request would reach it to wake a tier; keep minReplicas >= 1 on at least one pool" }}
{{- end }}
{{- range $tier, $raw := .Values.pools }}
{{- if eq $tier "auto" }}
{{- fail "pools.auto: `auto` is the model name that lets Foveal choose the tier; name the tier otherwise (e.g. t16)" }}
{{- end }}
{{- $p := include "foveal.poolValues" (dict "ctx" $ "pool" $raw) | fromYaml }}
{{- if ne (toString (get $p "enabled")) "false" }}
{{- if gt (int $p.minReplicas) (int $p.maxReplicas) }}
{{- fail (printf "pools.%s: minReplicas (%d) is greater than maxReplicas (%d)" $tier (int $p.minReplicas) (int $p.maxReplicas)) }}
{{- end }}
{{- if and (eq $p.backend "vllm") (hasKey $p "mechanism") }}
{{- fail (printf "pools.%s: mechanism %q applies to the reference backend only; vLLM pools reduce visual tokens through backendArgs.maxPixels" $tier (toString $p.mechanism)) }}
{{- end }}
{{- if and (eq $p.backend "vllm") (eq (toString $p.model) "foveal-ref") }}
{{- fail (printf "pools.%s: backend vllm needs `model`, the model vLLM serves (e.g. Qwen/Qwen2-VL-2B-Instruct); foveal-ref is the reference backend's model" $tier) }}
{{- end }}
{{- if and (eq $p.backend "reference") (hasKey $p "backendArgs") }}
{{- fail (printf "pools.%s: backendArgs apply to the vllm backend only (this pool's backend is reference)" $tier) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
