//! The Kubernetes manifests in `deploy/kubernetes/`, checked offline: `kubernetes-validate`
//! (pinned in `.native/venv-test` by `scripts/setup --test`) validates every resource it has a
//! schema for, strictly, against the oldest and newest Kubernetes versions it ships that we
//! support; what it cannot see (the ServiceMonitor CRD, kustomizations) and what no schema can
//! (do the probes hit real routes, do the ports agree, does the grace period cover the drain,
//! does the HPA's metric exist) is checked here in Rust against the server itself: its route
//! table, its configuration parser and, for the HPA's metric, the real `/metrics` of a running
//! server.
//!
//! Each variant (`cpu`, `gpu`) is resolved the way `kubectl apply -k` reads it: the kustomization
//! lists resources and nothing else (no patches, no generators), which is checked too, so the
//! resolved documents are exactly what the cluster receives. The `*_rejects_*` tests feed the
//! checks altered copies held in memory (files untouched) to show each check fails when it should.

mod common;

use common::*;
use leuknet::config::ServerConfig;
use leuknet::http::ROUTES;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kubernetes versions the manifests must validate against: the oldest we support and the
/// newest the pinned kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];
/// Kinds kubernetes-validate has no schema for; checked structurally below instead.
const SCHEMALESS_KINDS: &[&str] = &["ServiceMonitor", "Kustomization"];
/// The variants, one kustomization each.
const VARIANTS: &[&str] = &["cpu", "gpu"];
/// Seconds of slack the grace period must leave after preStop + drain.
const GRACE_MARGIN_S: u64 = 5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn assert_ok(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

fn assert_reports(problems: Vec<String>, needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got {problems:?}"
    );
}

/// Every YAML file under deploy/kubernetes, relative to it, sorted.
fn manifest_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(
                    path.strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(&k8s_dir(), &k8s_dir(), &mut out);
    out.sort();
    out
}

/// Every YAML document of a text.
fn documents(text: &str, source: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{source} is not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Reads a manifest (relative to deploy/kubernetes), through `alter` so tests can change it.
type Alter<'a> = &'a dyn Fn(&str, String) -> String;

fn read_manifest(rel: &str, alter: Alter) -> Option<String> {
    let text = std::fs::read_to_string(k8s_dir().join(rel)).ok()?;
    Some(alter(rel, text))
}

fn no_change(_: &str, text: String) -> String {
    text
}

/// Normalises `a/b/../c` to `a/c`.
fn normalise(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// The documents `kubectl apply -k deploy/kubernetes/<dir>` sends, with the files they came from;
/// problems for anything in a kustomization other than plain `resources`.
fn resolve_kustomization(
    dir: &str,
    alter: Alter,
    files: &mut Vec<String>,
) -> (Vec<Value>, Vec<String>) {
    let mut problems = Vec::new();
    let rel = format!("{dir}/kustomization.yaml");
    let Some(text) = read_manifest(&rel, alter) else {
        return (vec![], vec![format!("{rel} does not exist")]);
    };
    let k: Value = serde_yaml_ng::from_str(&text).expect("kustomization is YAML");
    for key in k.as_mapping().into_iter().flat_map(|m| m.keys()) {
        let key = key.as_str().unwrap_or("");
        if !["apiVersion", "kind", "resources"].contains(&key) {
            problems.push(format!(
                "{rel}: `{key}` would transform the resources; the checks here read the files as \
                 written, so only `resources` is allowed"
            ));
        }
    }
    let mut docs = Vec::new();
    for entry in k["resources"].as_sequence().into_iter().flatten() {
        let Some(entry) = entry.as_str() else {
            problems.push(format!("{rel}: a resource entry is not a string"));
            continue;
        };
        let target = normalise(&format!("{dir}/{entry}"));
        let path = k8s_dir().join(&target);
        if path.is_dir() {
            let (d, p) = resolve_kustomization(&target, alter, files);
            docs.extend(d);
            problems.extend(p);
        } else if let Some(text) = read_manifest(&target, alter) {
            files.push(target.clone());
            docs.extend(documents(&text, &target));
        } else {
            problems.push(format!("{rel}: resource {entry} does not exist"));
        }
    }
    (docs, problems)
}

/// One variant as the cluster would receive it.
struct Variant {
    name: String,
    docs: Vec<Value>,
    files: Vec<String>,
    problems: Vec<String>,
}

fn variant(name: &str, alter: Alter) -> Variant {
    let mut files = Vec::new();
    let (docs, problems) = resolve_kustomization(name, alter, &mut files);
    Variant {
        name: name.to_string(),
        docs,
        files,
        problems,
    }
}

/// The Prometheus adapter's ConfigMap and its rules.
fn adapter_rules(alter: Alter) -> Vec<Value> {
    let text = read_manifest("prometheus-adapter/rules.yaml", alter)
        .expect("deploy/kubernetes/prometheus-adapter/rules.yaml exists");
    let cm: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(cm["kind"], "ConfigMap", "the adapter rules are a ConfigMap");
    let config: Value = serde_yaml_ng::from_str(
        cm["data"]["config.yaml"]
            .as_str()
            .expect("the ConfigMap has data.config.yaml"),
    )
    .expect("config.yaml is YAML");
    config["rules"].as_sequence().cloned().unwrap_or_default()
}

// ---- helpers over resources --------------------------------------------------------------------

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            Some((k.as_str()?.to_string(), v))
        })
        .collect()
}

/// True when every label of `selector` is in `labels` with the same value (and there is one).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container's plain `value` env vars (valueFrom entries are resolved only in the cluster).
fn container_env(c: &Value) -> BTreeMap<String, String> {
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// `LEUKNET_*` env of the container as the server would parse it, or the problems.
fn server_config(env: &BTreeMap<String, String>, source: &str) -> Result<ServerConfig, String> {
    let cmd = <ServerConfig as clap::CommandFactory>::command();
    let flags: BTreeMap<String, String> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_str()?.to_string(),
                a.get_long()?.to_string(),
            ))
        })
        .collect();
    let mut argv = vec!["leuknet-server".to_string()];
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("LEUKNET_")) {
        match flags.get(k) {
            None => {
                return Err(format!(
                    "{source}: {k} is not a leuknet-server flag's env var"
                ))
            }
            Some(long) => argv.push(format!("--{long}={v}")),
        }
    }
    <ServerConfig as clap::Parser>::try_parse_from(&argv)
        .map_err(|e| format!("{source}: {argv:?} is not a valid server configuration: {e}"))
}

/// A container port given by number or by name.
fn resolve_port(port: &Value, container: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().map(|n| n as u16),
        Value::String(name) => container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .map(|n| n as u16),
        _ => None,
    }
}

/// CPU quantity in millicores ("2", "1500m", 2).
fn millicores(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_f64().map(|f| (f * 1000.0) as u64),
        Value::String(s) => match s.strip_suffix('m') {
            Some(m) => m.parse().ok(),
            None => s.parse::<f64>().ok().map(|f| (f * 1000.0) as u64),
        },
        _ => None,
    }
}

fn get_route(path: &str) -> bool {
    ROUTES.iter().any(|r| r.method == "GET" && r.path == path)
}

fn quantity_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

// ---- the checks ---------------------------------------------------------------------------------

/// Everything about one variant that no schema can check.
fn check_variant(v: &Variant, adapter: &[Value]) -> Vec<String> {
    let mut problems = v.problems.clone();
    let n = &v.name;
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    ] {
        let found = of_kind(&v.docs, kind).len();
        if found != 1 {
            problems.push(format!("{n}: {found} {kind} resources, want exactly 1"));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let deploy = of_kind(&v.docs, "Deployment")[0];
    let service = of_kind(&v.docs, "Service")[0];
    let pdb = of_kind(&v.docs, "PodDisruptionBudget")[0];
    let hpa = of_kind(&v.docs, "HorizontalPodAutoscaler")[0];
    let monitor = of_kind(&v.docs, "ServiceMonitor")[0];
    let pod = &deploy["spec"]["template"]["spec"];
    let pod_labels = string_map(&deploy["spec"]["template"]["metadata"]["labels"]);

    if !selects(
        &string_map(&deploy["spec"]["selector"]["matchLabels"]),
        &pod_labels,
    ) {
        problems.push(format!(
            "{n}: the Deployment's selector does not match its pod labels"
        ));
    }
    let Some(container) = pod["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "leuknet"))
    else {
        problems.push(format!("{n}: no container named leuknet"));
        return problems;
    };
    let env = container_env(container);
    let config = match server_config(&env, n) {
        Ok(c) => c,
        Err(e) => {
            problems.push(e);
            return problems;
        }
    };
    let port = config.addr.port();
    if !config.addr.ip().is_unspecified() {
        problems.push(format!(
            "{n}: LEUKNET_ADDR {} is unreachable from outside the pod (use 0.0.0.0)",
            config.addr
        ));
    }
    if resolve_port(&Value::String("http".into()), container) != Some(port) {
        problems.push(format!(
            "{n}: the container port named http is not the server's port {port}"
        ));
    }

    // Probes: real GET routes on the server's port; readiness on the route that turns 503.
    for (probe, want) in [
        ("readinessProbe", Some("/health/ready")),
        ("livenessProbe", Some("/health/live")),
        ("startupProbe", None),
    ] {
        let p = &container[probe];
        if p.is_null() {
            if want.is_some() {
                problems.push(format!("{n}: no {probe}"));
            }
            continue;
        }
        let path = p["httpGet"]["path"].as_str().unwrap_or("");
        if !get_route(path) {
            problems.push(format!(
                "{n}: {probe} path {path:?} is not a GET route of the server"
            ));
        }
        if let Some(want) = want {
            if path != want {
                problems.push(format!("{n}: {probe} probes {path:?}, want {want}"));
            }
        }
        let probe_port = resolve_port(&p["httpGet"]["port"], container);
        if probe_port != Some(port) {
            problems.push(format!(
                "{n}: {probe} probes port {probe_port:?}, the server listens on {port}"
            ));
        }
    }

    // Shutdown: preStop + drain must fit in the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let pre_stop = &container["lifecycle"]["preStop"];
    let pre_stop_s = match (
        pre_stop["exec"]["command"].as_sequence(),
        pre_stop["sleep"]["seconds"].as_u64(),
    ) {
        (Some(cmd), _) if cmd.first().and_then(Value::as_str) == Some("sleep") => {
            cmd.get(1).and_then(|s| s.as_str()?.parse::<u64>().ok())
        }
        (_, Some(s)) => Some(s),
        _ => None,
    };
    match pre_stop_s {
        None => problems.push(format!(
            "{n}: no preStop sleep: requests routed during endpoint removal would get 503"
        )),
        Some(s) => {
            let needed_ms = s * 1000 + config.drain_timeout_ms + GRACE_MARGIN_S * 1000;
            if grace * 1000 < needed_ms {
                problems.push(format!(
                    "{n}: terminationGracePeriodSeconds {grace} s is less than preStop {s} s + \
                     drain timeout {} ms + {GRACE_MARGIN_S} s",
                    config.drain_timeout_ms
                ));
            }
        }
    }

    // Non-root, read-only root filesystem, nothing extra.
    let pod_sc = &pod["securityContext"];
    let sc = &container["securityContext"];
    let either = |k: &str| {
        if sc[k].is_null() {
            pod_sc[k].clone()
        } else {
            sc[k].clone()
        }
    };
    if either("runAsNonRoot") != Value::Bool(true) {
        problems.push(format!("{n}: runAsNonRoot is not true"));
    }
    match either("runAsUser").as_u64() {
        Some(0) => problems.push(format!("{n}: runAsUser is 0 (root)")),
        None => problems.push(format!(
            "{n}: no runAsUser (the image's user is not checked here)"
        )),
        Some(_) => {}
    }
    if sc["readOnlyRootFilesystem"] != Value::Bool(true) {
        problems.push(format!("{n}: readOnlyRootFilesystem is not true"));
    }
    if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
        problems.push(format!("{n}: allowPrivilegeEscalation is not false"));
    }
    if !sc["capabilities"]["drop"]
        .as_sequence()
        .is_some_and(|d| d.iter().any(|c| c == "ALL"))
    {
        problems.push(format!("{n}: capabilities are not dropped (drop: [ALL])"));
    }

    // Volumes: every mount has a volume; only emptyDir is writable; the model card is mounted.
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?.to_string(), v)))
        .collect();
    let mut mount_paths = Vec::new();
    for m in container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let name = m["name"].as_str().unwrap_or("");
        let path = m["mountPath"].as_str().unwrap_or("").to_string();
        match volumes.get(name) {
            None => problems.push(format!("{n}: volumeMount {name} has no volume")),
            Some(vol) if vol["emptyDir"].is_null() && m["readOnly"] != Value::Bool(true) => {
                problems.push(format!(
                    "{n}: volume {name} at {path} is writable and not an emptyDir"
                ))
            }
            Some(_) => {}
        }
        mount_paths.push(path);
    }
    let card = config.model_card.to_string_lossy().to_string();
    if !mount_paths
        .iter()
        .any(|p| card.starts_with(&format!("{}/", p.trim_end_matches('/'))))
    {
        problems.push(format!(
            "{n}: the model card {card} is on no mounted volume"
        ));
    }

    // Resources: requests and limits; the GPU variant asks for one GPU and runs CUDA.
    for side in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            if container["resources"][side][r].is_null() {
                problems.push(format!("{n}: no resources.{side}.{r}"));
            }
        }
    }
    let gpus = &container["resources"]["limits"]["nvidia.com/gpu"];
    let wants_gpu = n == "gpu";
    let device = format!("{:?}", config.device).to_lowercase();
    if wants_gpu {
        if gpus.as_u64() != Some(1) {
            problems.push(format!("{n}: limits nvidia.com/gpu is {gpus:?}, want 1"));
        }
        if device != "cuda" {
            problems.push(format!(
                "{n}: LEUKNET_DEVICE is {device}, want cuda with a GPU"
            ));
        }
    } else {
        if !gpus.is_null() {
            problems.push(format!("{n}: asks for a GPU"));
        }
        if device != "cpu" {
            problems.push(format!("{n}: LEUKNET_DEVICE is {device}, want cpu"));
        }
    }
    if let Some(limit) = millicores(&container["resources"]["limits"]["cpu"]) {
        let threads = config.intra_threads as u64;
        if threads == 0 || threads * 1000 > limit.max(1000) {
            problems.push(format!(
                "{n}: LEUKNET_INTRA_THREADS {threads} (0 = one per host core) does not fit the \
                 CPU limit of {limit}m"
            ));
        }
    }
    let image = container["image"].as_str().unwrap_or("");
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    if tag.is_empty() || tag == "latest" || tag.contains('/') {
        problems.push(format!("{n}: image {image:?} has no pinned tag"));
    }

    // Service -> pods, port -> the server's port.
    let service_labels = string_map(&service["metadata"]["labels"]);
    if !selects(&string_map(&service["spec"]["selector"]), &pod_labels) {
        problems.push(format!(
            "{n}: the Service's selector does not match the pod labels"
        ));
    }
    let service_ports: Vec<&Value> = service["spec"]["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .collect();
    for sp in &service_ports {
        let target = if sp["targetPort"].is_null() {
            &sp["port"]
        } else {
            &sp["targetPort"]
        };
        if resolve_port(target, container) != Some(port) {
            problems.push(format!(
                "{n}: Service port {:?} targets {target:?}, not the server's port {port}",
                sp["name"]
            ));
        }
    }

    // PDB below the HPA's floor (else a node drain could never evict).
    if !selects(
        &string_map(&pdb["spec"]["selector"]["matchLabels"]),
        &pod_labels,
    ) {
        problems.push(format!(
            "{n}: the PodDisruptionBudget selects no leuknet pod"
        ));
    }
    let min_replicas = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
    match pdb["spec"]["minAvailable"].as_u64() {
        Some(m) if m >= min_replicas => problems.push(format!(
            "{n}: PDB minAvailable {m} >= HPA minReplicas {min_replicas}: drains would block"
        )),
        Some(_) => {}
        None => {
            if pdb["spec"]["maxUnavailable"].is_null() {
                problems.push(format!(
                    "{n}: the PDB sets neither minAvailable nor maxUnavailable"
                ));
            }
        }
    }

    // HPA -> this Deployment, on a metric the adapter serves, below the 429 threshold.
    let target = &hpa["spec"]["scaleTargetRef"];
    if target["kind"] != "Deployment"
        || target["apiVersion"] != "apps/v1"
        || target["name"] != deploy["metadata"]["name"]
    {
        problems.push(format!(
            "{n}: the HPA scales {target:?}, not the Deployment"
        ));
    }
    let served: Vec<String> = adapter
        .iter()
        .filter_map(|r| r["name"]["as"].as_str().map(str::to_string))
        .collect();
    let metrics: Vec<&Value> = hpa["spec"]["metrics"]
        .as_sequence()
        .into_iter()
        .flatten()
        .collect();
    if metrics.is_empty() {
        problems.push(format!("{n}: the HPA has no metrics"));
    }
    for m in metrics {
        let ty = m["type"].as_str().unwrap_or("");
        let key = match ty {
            "Pods" => "pods",
            "External" => "external",
            "Object" => "object",
            _ => {
                problems.push(format!("{n}: HPA metric type {ty:?}: want the queue depth"));
                continue;
            }
        };
        let name = m[key]["metric"]["name"].as_str().unwrap_or("");
        if !served.iter().any(|s| s == name) {
            problems.push(format!(
                "{n}: the HPA's metric {name:?} is served by no Prometheus adapter rule ({served:?})"
            ));
        }
        let avg = quantity_number(&m[key]["target"]["averageValue"])
            .or_else(|| quantity_number(&m[key]["target"]["value"]));
        match avg {
            Some(a) if a > 0.0 && a < config.max_queue_images as f64 => {}
            other => problems.push(format!(
                "{n}: HPA target {other:?} is not between 0 and --max-queue-images {} (where 429s begin)",
                config.max_queue_images
            )),
        }
    }

    // ServiceMonitor -> the Service, its named port, the metrics route.
    if !selects(
        &string_map(&monitor["spec"]["selector"]["matchLabels"]),
        &service_labels,
    ) {
        problems.push(format!(
            "{n}: the ServiceMonitor's selector does not match the Service"
        ));
    }
    let endpoints: Vec<&Value> = monitor["spec"]["endpoints"]
        .as_sequence()
        .into_iter()
        .flatten()
        .collect();
    if endpoints.is_empty() {
        problems.push(format!("{n}: the ServiceMonitor has no endpoints"));
    }
    for e in endpoints {
        let p = e["port"].as_str().unwrap_or("");
        if !service_ports.iter().any(|sp| sp["name"] == p) {
            problems.push(format!(
                "{n}: the ServiceMonitor scrapes port {p:?}, not a named Service port"
            ));
        }
        let path = e["path"].as_str().unwrap_or("/metrics");
        if !get_route(path) || path != "/metrics" {
            problems.push(format!(
                "{n}: the ServiceMonitor scrapes {path:?}, not /metrics"
            ));
        }
        if e["scheme"].as_str().is_some_and(|s| s != "http") {
            problems.push(format!("{n}: the ServiceMonitor scheme is not http"));
        }
    }
    problems
}

/// The adapter's rule for each HPA metric: a series query on that metric with the namespace and
/// pod labels mapped, so the HPA's Pods metric resolves per pod.
fn check_adapter(adapter: &[Value], metric: &str) -> Vec<String> {
    let Some(rule) = adapter.iter().find(|r| r["name"]["as"] == metric) else {
        return vec![format!("no adapter rule serves {metric}")];
    };
    let mut problems = Vec::new();
    let query = rule["seriesQuery"].as_str().unwrap_or("");
    if !query.starts_with(&format!("{metric}{{")) && query != metric {
        problems.push(format!("the rule for {metric} queries {query:?}"));
    }
    for (label, resource) in [("namespace", "namespace"), ("pod", "pod")] {
        if rule["resources"]["overrides"][label]["resource"] != resource {
            problems.push(format!(
                "the rule for {metric} does not map label {label} to {resource}"
            ));
        }
    }
    if !rule["metricsQuery"]
        .as_str()
        .unwrap_or("")
        .contains("<<.LabelMatchers>>")
    {
        problems.push(format!("the rule for {metric} ignores <<.LabelMatchers>>"));
    }
    problems
}

/// Every metric name the HPA of the cpu variant asks for.
fn hpa_metric_names() -> Vec<String> {
    let v = variant("cpu", &no_change);
    of_kind(&v.docs, "HorizontalPodAutoscaler")
        .iter()
        .flat_map(|h| {
            h["spec"]["metrics"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|m| {
            ["pods", "external", "object"]
                .iter()
                .find_map(|k| m[*k]["metric"]["name"].as_str().map(str::to_string))
        })
        .collect()
}

// ---- tests on the repository's files -----------------------------------------------------------

#[test]
fn every_variant_is_consistent_with_the_server() {
    let adapter = adapter_rules(&no_change);
    for name in VARIANTS {
        assert_ok(check_variant(&variant(name, &no_change), &adapter));
    }
}

#[test]
fn the_adapter_serves_every_hpa_metric_per_pod() {
    let adapter = adapter_rules(&no_change);
    let names = hpa_metric_names();
    assert!(!names.is_empty());
    for name in names {
        assert_ok(check_adapter(&adapter, &name));
    }
}

#[test]
fn variants_differ_only_in_device_resources_and_scheduling() {
    // The same Service, PDB, HPA and monitor (from base), and Deployments alike except for what
    // a GPU changes: so the checks above cover both and the two cannot drift apart unnoticed.
    let cpu = variant("cpu", &no_change);
    let gpu = variant("gpu", &no_change);
    let shared = |v: &Variant| -> Vec<Value> {
        v.docs
            .iter()
            .filter(|d| d["kind"] != "Deployment")
            .cloned()
            .collect()
    };
    assert_eq!(shared(&cpu), shared(&gpu));
    let strip = |v: &Variant| {
        let mut d = of_kind(&v.docs, "Deployment")[0].clone();
        let pod = &mut d["spec"]["template"]["spec"];
        pod["tolerations"] = Value::Null;
        pod["volumes"] = Value::Null;
        let c = &mut pod["containers"][0];
        c["resources"] = Value::Null;
        c["env"] = Value::Null;
        d
    };
    assert_eq!(strip(&cpu), strip(&gpu));
}

#[test]
fn every_manifest_belongs_to_a_variant_or_is_the_adapter_rule() {
    let mut used: Vec<String> = vec!["prometheus-adapter/rules.yaml".into()];
    for name in VARIANTS {
        let v = variant(name, &no_change);
        used.extend(v.files);
        used.push(format!("{name}/kustomization.yaml"));
    }
    used.push("base/kustomization.yaml".into());
    for f in manifest_files() {
        assert!(
            used.contains(&f),
            "deploy/kubernetes/{f} is applied by no variant"
        );
    }
}

/// kubernetes-validate, or None when the test tools were never installed (skip).
fn kubernetes_validate() -> Option<PathBuf> {
    let native = root().join(".native");
    let venv = native.join("venv-test");
    let exe = venv.join("bin/kubernetes-validate");
    if exe.is_file() {
        return Some(exe);
    }
    if !native.join("test-tools.ready").exists() && !venv.exists() {
        eprintln!("skipping: kubernetes-validate needs ./scripts/setup --test");
        return None;
    }
    panic!(
        "{} is missing although the test tools are installed: rerun ./scripts/setup --test",
        exe.display()
    );
}

#[test]
fn kubernetes_validate_accepts_every_manifest() {
    let Some(tool) = kubernetes_validate() else {
        return;
    };
    let files = manifest_files();
    let resources = files
        .iter()
        .flat_map(|f| documents(&std::fs::read_to_string(k8s_dir().join(f)).unwrap(), f))
        .filter(|d| !SCHEMALESS_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
        .count();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .current_dir(k8s_dir())
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version} failed:\n{text}"
        );
        let passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(
            passed, resources,
            "every resource with a schema passes ({version}):\n{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with("INFO ")) {
            assert!(
                SCHEMALESS_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
                "unexpected kubernetes-validate output ({version}): {line}"
            );
        }
    }
}

/// When kubectl is on PATH, its kustomize build of each variant must equal the documents this
/// test reads (so the checks above see what the cluster gets). kubectl is not a test tool.
#[test]
fn kubectl_kustomize_agrees_when_installed() {
    for name in VARIANTS {
        let out = match Command::new("kubectl")
            .args(["kustomize", &k8s_dir().join(name).to_string_lossy()])
            .output()
        {
            Err(_) => {
                eprintln!("kubectl not installed; skipped `kubectl kustomize`");
                return;
            }
            Ok(out) => out,
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let built = documents(&String::from_utf8_lossy(&out.stdout), "kubectl kustomize");
        let key = |d: &Value| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        };
        let mut built: Vec<(String, Value)> = built.into_iter().map(|d| (key(&d), d)).collect();
        let mut ours: Vec<(String, Value)> = variant(name, &no_change)
            .docs
            .into_iter()
            .map(|d| (key(&d), d))
            .collect();
        built.sort_by(|a, b| a.0.cmp(&b.0));
        ours.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(built, ours, "{name}");
    }
}

/// The metric the HPA scales on is one the real server exports, as a gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpa_metric_is_exported_by_the_server() {
    let names = hpa_metric_names();
    let server = Server::start(&fixture_card(16), &[]).await;
    let text = server.metrics().await;
    for name in names {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} gauge")),
            "the server's /metrics has no gauge {name}:\n{text}"
        );
        assert!(
            metric_value(&text, &name, "").is_some(),
            "no sample of {name}"
        );
    }
}

// ---- the checks catch what they claim (altered copies in memory) ------------------------------

fn altered(
    file: &'static str,
    from: &'static str,
    to: &'static str,
) -> impl Fn(&str, String) -> String {
    move |rel: &str, text: String| {
        if rel == file {
            assert!(
                text.contains(from),
                "{file} no longer contains {from:?}; update this test"
            );
            text.replacen(from, to, 1)
        } else {
            text
        }
    }
}

fn problems_with(
    variant_name: &str,
    file: &'static str,
    from: &'static str,
    to: &'static str,
) -> Vec<String> {
    let alter = altered(file, from, to);
    check_variant(&variant(variant_name, &alter), &adapter_rules(&alter))
}

#[test]
fn probe_checks_reject_unknown_routes_and_wrong_ports() {
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "path: /health/ready",
            "path: /healthz",
        ),
        "not a GET route of the server",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "path: /health/ready",
            "path: /health/live",
        ),
        "readinessProbe probes \"/health/live\", want /health/ready",
    );
    assert_reports(
        problems_with(
            "gpu",
            "gpu/deployment.yaml",
            "containerPort: 8080",
            "containerPort: 9000",
        ),
        "the container port named http is not the server's port 8080",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "\"0.0.0.0:8080\"",
            "\"127.0.0.1:8080\"",
        ),
        "unreachable from outside the pod",
    );
    assert_reports(
        problems_with(
            "cpu",
            "base/service.yaml",
            "targetPort: http",
            "targetPort: 8081",
        ),
        "not the server's port 8080",
    );
}

#[test]
fn shutdown_check_rejects_a_grace_period_shorter_than_the_drain() {
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 30",
        ),
        "terminationGracePeriodSeconds 30 s is less than preStop 5 s + drain timeout 30000 ms",
    );
    assert_reports(
        problems_with(
            "gpu",
            "gpu/deployment.yaml",
            "value: \"30000\"",
            "value: \"60000\"",
        ),
        "drain timeout 60000 ms",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "command: [\"sleep\", \"5\"]",
            "command: [\"true\"]",
        ),
        "no preStop sleep",
    );
    // Without LEUKNET_DRAIN_TIMEOUT_MS the server's default (30 s) is the one checked.
    assert_ok(problems_with(
        "cpu",
        "cpu/deployment.yaml",
        "            - name: LEUKNET_DRAIN_TIMEOUT_MS\n              value: \"30000\"\n",
        "",
    ));
}

#[test]
fn security_checks_reject_root_writable_root_fs_and_writable_volumes() {
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
        ),
        "readOnlyRootFilesystem is not true",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "runAsUser: 10001\n            allowPrivilegeEscalation",
            "runAsUser: 0\n            allowPrivilegeEscalation",
        ),
        "runAsUser is 0",
    );
    assert_reports(
        problems_with(
            "gpu",
            "gpu/deployment.yaml",
            "runAsNonRoot: true\n            runAsUser",
            "runAsNonRoot: false\n            runAsUser",
        ),
        "runAsNonRoot is not true",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "mountPath: /models\n              readOnly: true",
            "mountPath: /models",
        ),
        "is writable and not an emptyDir",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "value: /models/leuknet.json",
            "value: /srv/leuknet.json",
        ),
        "is on no mounted volume",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "name: LEUKNET_DEVICE",
            "name: LEUKNET_DEVICES",
        ),
        "LEUKNET_DEVICES is not a leuknet-server flag",
    );
}

#[test]
fn resource_checks_reject_a_gpu_variant_without_a_gpu_and_threads_above_the_limit() {
    assert_reports(
        problems_with(
            "gpu",
            "gpu/deployment.yaml",
            "              nvidia.com/gpu: 1\n",
            "",
        ),
        "limits nvidia.com/gpu is Null, want 1",
    );
    assert_reports(
        problems_with("gpu", "gpu/deployment.yaml", "value: cuda", "value: auto"),
        "want cuda with a GPU",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "LEUKNET_INTRA_THREADS\n              value: \"2\"",
            "LEUKNET_INTRA_THREADS\n              value: \"8\"",
        ),
        "does not fit the CPU limit of 2000m",
    );
    assert_reports(
        problems_with(
            "cpu",
            "cpu/deployment.yaml",
            "image: leuknet:0.1.0",
            "image: leuknet:latest",
        ),
        "has no pinned tag",
    );
}

#[test]
fn scaling_checks_reject_unserved_metrics_high_targets_and_blocking_budgets() {
    assert_reports(
        problems_with(
            "cpu",
            "base/horizontalpodautoscaler.yaml",
            "name: leuknet_queue_depth_images",
            "name: leuknet_queue_depth",
        ),
        "is served by no Prometheus adapter rule",
    );
    assert_reports(
        problems_with(
            "cpu",
            "base/horizontalpodautoscaler.yaml",
            "averageValue: \"4\"",
            "averageValue: \"64\"",
        ),
        "is not between 0 and --max-queue-images 64",
    );
    assert_reports(
        problems_with(
            "cpu",
            "base/poddisruptionbudget.yaml",
            "minAvailable: 1",
            "minAvailable: 2",
        ),
        "drains would block",
    );
    assert_reports(
        problems_with(
            "cpu",
            "base/horizontalpodautoscaler.yaml",
            "    name: leuknet\n  minReplicas",
            "    name: leuknet-gpu\n  minReplicas",
        ),
        "not the Deployment",
    );
    assert_reports(
        problems_with(
            "cpu",
            "base/servicemonitor.yaml",
            "- port: http",
            "- port: web",
        ),
        "not a named Service port",
    );
    assert_reports(
        problems_with(
            "cpu",
            "base/servicemonitor.yaml",
            "path: /metrics",
            "path: /stats",
        ),
        "not /metrics",
    );
    let alter = altered(
        "prometheus-adapter/rules.yaml",
        "pod: {resource: \"pod\"}",
        "pod: {resource: \"pods\"}",
    );
    assert_reports(
        check_adapter(&adapter_rules(&alter), "leuknet_queue_depth_images"),
        "does not map label pod to pod",
    );
}

#[test]
fn kustomization_checks_reject_missing_resources_and_transformers() {
    assert_reports(
        problems_with(
            "cpu",
            "base/kustomization.yaml",
            "- servicemonitor.yaml",
            "- servicemonitors.yaml",
        ),
        "resource servicemonitors.yaml does not exist",
    );
    assert_reports(
        problems_with(
            "gpu",
            "gpu/kustomization.yaml",
            "resources:",
            "namePrefix: x-\nresources:",
        ),
        "`namePrefix` would transform the resources",
    );
    assert_reports(
        problems_with("gpu", "gpu/kustomization.yaml", "  - ../base\n", ""),
        "0 Service resources",
    );
}
