//! Offline checks of the deployment files (Dockerfile, .dockerignore, docker-compose.yml,
//! deploy/prometheus.yml): no Docker engine, no network. They catch what a `docker build` or
//! `docker compose up` would only find late: a COPY of a missing or ignored file, a root user, a
//! health check on the wrong route or port, an env var the server does not read, a volume source
//! that is not in the repository, a Prometheus target that is not the service.
//!
//! Each check is a function over file text returning the problems it found; the `*_rejects_*`
//! tests feed it an altered copy held in memory (the files are never changed) to show it fails.

use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
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

// ---- Dockerfile parsing ---------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Instr {
    line: usize,
    keyword: String,
    rest: String,
}

#[derive(Debug, Clone)]
struct Stage {
    name: Option<String>,
    image: String,
    instrs: Vec<Instr>,
}

/// Instructions with continuation lines joined and comment lines dropped, as Docker reads them.
fn parse_instructions(text: &str) -> Vec<Instr> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut start = 0;
    let mut flush = |buf: &mut String, start: usize| {
        let s = buf.trim();
        if !s.is_empty() {
            let (kw, rest) = s.split_once(char::is_whitespace).unwrap_or((s, ""));
            out.push(Instr {
                line: start,
                keyword: kw.to_ascii_uppercase(),
                rest: rest.trim().to_string(),
            });
        }
        buf.clear();
    };
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.starts_with('#') || (trimmed.is_empty() && !buf.is_empty()) {
            continue;
        }
        if buf.is_empty() {
            if trimmed.is_empty() {
                continue;
            }
            start = i + 1;
        }
        match raw.trim_end().strip_suffix('\\') {
            Some(head) => {
                buf.push_str(head);
                buf.push(' ');
            }
            None => {
                buf.push_str(raw);
                flush(&mut buf, start);
            }
        }
    }
    flush(&mut buf, start);
    out
}

fn stages(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for instr in parse_instructions(text) {
        if instr.keyword == "FROM" {
            let toks: Vec<&str> = instr
                .rest
                .split_whitespace()
                .filter(|t| !t.starts_with("--"))
                .collect();
            let name = match toks.as_slice() {
                [_, as_kw, name, ..] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                name,
                image: toks.first().copied().unwrap_or("").to_string(),
                instrs: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instrs.push(instr);
        }
    }
    stages
}

/// Shell-like words (double and single quotes, backslash escapes), or a JSON array (exec form).
fn words(rest: &str) -> Vec<String> {
    let t = rest.trim();
    if t.starts_with('[') {
        if let Ok(v) = serde_json::from_str::<Vec<String>>(t) {
            return v;
        }
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = t.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (Some(_), c) => cur.push(c),
            (None, '"') | (None, '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// `--flag=value` options in front of an instruction's arguments, and the arguments after them.
fn flags_and_args(rest: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut flags = BTreeMap::new();
    let mut toks = rest.trim();
    while let Some(after) = toks.strip_prefix("--") {
        let (flag, tail) = after.split_once(char::is_whitespace).unwrap_or((after, ""));
        let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
        flags.insert(k.to_string(), v.to_string());
        toks = tail.trim_start();
    }
    (flags, words(toks))
}

/// `ENV K=V ...` (or the legacy `ENV K V`) of one stage, in order.
fn stage_env(stage: &Stage) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for i in stage.instrs.iter().filter(|i| i.keyword == "ENV") {
        let w = words(&i.rest);
        if w.first().is_some_and(|f| f.contains('=')) {
            for kv in w {
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                env.push((k.to_string(), v.to_string()));
            }
        } else if let Some((k, v)) = i.rest.trim().split_once(char::is_whitespace) {
            env.push((k.to_string(), v.trim().to_string()));
        }
    }
    env
}

fn stage_label(stage: &Stage, index: usize) -> String {
    stage
        .name
        .clone()
        .unwrap_or_else(|| format!("#{index} ({})", stage.image))
}

// ---- .dockerignore --------------------------------------------------------------------------

/// The .dockerignore rules, matched like Docker's patternmatcher for the cases used here:
/// `*` and `?` within one path segment, `**` across segments, `!` to re-include, the last
/// matching rule wins, and a rule matching a parent folder matches everything inside it.
struct DockerIgnore {
    rules: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn parse(text: &str) -> Self {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (negated, pat) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let segs = pat
                    .trim_start_matches("./")
                    .trim_matches('/')
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_string)
                    .collect();
                (negated, segs)
            })
            .collect();
        Self { rules }
    }

    fn is_excluded(&self, rel: &str) -> bool {
        let segs: Vec<&str> = rel
            .trim_start_matches("./")
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        let mut excluded = false;
        for (negated, pat) in &self.rules {
            let pat: Vec<&str> = pat.iter().map(String::as_str).collect();
            if (1..=segs.len()).any(|n| match_segments(&pat, &segs[..n])) {
                excluded = !negated;
            }
        }
        excluded
    }
}

fn match_segments(pat: &[&str], path: &[&str]) -> bool {
    match (pat.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            match_segments(&pat[1..], path) || (!path.is_empty() && match_segments(pat, &path[1..]))
        }
        (Some(p), Some(s)) => {
            match_glob(p.as_bytes(), s.as_bytes()) && match_segments(&pat[1..], &path[1..])
        }
        _ => false,
    }
}

fn match_glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => match_glob(&p[1..], s) || (!s.is_empty() && match_glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => match_glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => match_glob(&p[1..], &s[1..]),
        _ => false,
    }
}

// ---- the server's flags ---------------------------------------------------------------------

/// env var name -> long flag, straight from the server's clap definition.
fn server_env_flags() -> BTreeMap<String, String> {
    let cmd = <leuknet::config::ServerConfig as clap::CommandFactory>::command();
    cmd.get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((env, a.get_long()?.to_string()))
        })
        .collect()
}

/// Every `LEUKNET_*` variable must be a server flag, and together their values must parse as
/// the server's configuration (so `LEUKNET_LOG_FORMAT=jsn` or a bad address is caught here).
fn check_leuknet_env(env: &BTreeMap<String, String>, source: &str) -> Vec<String> {
    let flags = server_env_flags();
    let mut problems = Vec::new();
    let mut argv = vec!["leuknet-server".to_string()];
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("LEUKNET_")) {
        match flags.get(k) {
            None => problems.push(format!(
                "{source}: {k} is not a leuknet-server flag's env var (known: {:?})",
                flags.keys().collect::<Vec<_>>()
            )),
            Some(long) if !v.contains('$') => argv.push(format!("--{long}={v}")),
            Some(_) => {}
        }
    }
    if let Err(e) = <leuknet::config::ServerConfig as clap::Parser>::try_parse_from(&argv) {
        problems.push(format!(
            "{source}: {argv:?} is not a valid server configuration: {e}"
        ));
    }
    problems
}

// ---- the repository's Dockerfile and compose file -------------------------------------------

struct Deploy {
    compose: Value,
    /// Folder of docker-compose.yml; relative paths in it resolve from here.
    compose_dir: PathBuf,
    /// Build context of the leuknet service.
    context: PathBuf,
    dockerfile_text: String,
    dockerignore: DockerIgnore,
}

fn deploy() -> Deploy {
    deploy_from(&read("docker-compose.yml"), None)
}

/// Parses the compose text and the Dockerfile it names, or `dockerfile_text` instead of it.
fn deploy_from(compose_text: &str, dockerfile_text: Option<&str>) -> Deploy {
    let compose: Value = serde_yaml_ng::from_str(compose_text).expect("docker-compose.yml is YAML");
    let compose_dir = root();
    let build = &compose["services"]["leuknet"]["build"];
    let context_rel = build
        .as_str()
        .or_else(|| build["context"].as_str())
        .expect("services.leuknet.build (or build.context) is set");
    let context = compose_dir.join(context_rel);
    let dockerfile_rel = build["dockerfile"].as_str().unwrap_or("Dockerfile");
    let dockerfile_text = match dockerfile_text {
        Some(t) => t.to_string(),
        None => std::fs::read_to_string(context.join(dockerfile_rel)).unwrap_or_default(),
    };
    let dockerignore = DockerIgnore::parse(
        &std::fs::read_to_string(context.join(".dockerignore")).unwrap_or_default(),
    );
    Deploy {
        compose,
        compose_dir,
        context,
        dockerfile_text,
        dockerignore,
    }
}

/// The last stage (the image that runs); an empty one if the text has no FROM.
fn final_stage(text: &str) -> Stage {
    stages(text).pop().unwrap_or(Stage {
        name: None,
        image: String::new(),
        instrs: Vec::new(),
    })
}

/// The port EXPOSEd by the final stage (exactly one).
fn exposed_ports(text: &str) -> Vec<u16> {
    final_stage(text)
        .instrs
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| words(&i.rest))
        .filter_map(|p| p.split('/').next()?.parse().ok())
        .collect()
}

fn port_in_url(text: &str, path: &str) -> Option<u16> {
    let at = text.find(path)?;
    let before = &text[..at];
    let colon = before.rfind(':')?;
    before[colon + 1..].parse().ok()
}

/// Container ports published by a compose service (short and long syntax).
fn published_container_ports(service: &Value) -> Vec<u16> {
    let Some(ports) = service["ports"].as_sequence() else {
        return vec![];
    };
    ports
        .iter()
        .filter_map(|p| match p {
            Value::String(s) => s.rsplit(':').next()?.split('/').next()?.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::Mapping(_) => p["target"].as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .collect()
}

/// A compose volume: (source, target, read_only). Short syntax `src:dst[:mode]` or long syntax.
fn volumes(service: &Value) -> Vec<(String, String, bool)> {
    let Some(vols) = service["volumes"].as_sequence() else {
        return vec![];
    };
    vols.iter()
        .filter_map(|v| match v {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                match parts.as_slice() {
                    [src, dst] => Some((src.to_string(), dst.to_string(), false)),
                    [src, dst, mode] => Some((
                        src.to_string(),
                        dst.to_string(),
                        mode.split(',').any(|m| m == "ro"),
                    )),
                    _ => None,
                }
            }
            Value::Mapping(_) => Some((
                v["source"].as_str()?.to_string(),
                v["target"].as_str()?.to_string(),
                v["read_only"].as_bool().unwrap_or(false),
            )),
            _ => None,
        })
        .collect()
}

fn is_bind_source(src: &str) -> bool {
    src.starts_with('.') || src.starts_with('/') || src.starts_with('~')
}

/// `environment:` of a compose service, as a map (list or mapping syntax).
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match &service["environment"] {
        Value::Mapping(m) => {
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                env.insert(k.as_str().unwrap_or_default().to_string(), v);
            }
        }
        Value::Sequence(s) => {
            for item in s.iter().filter_map(Value::as_str) {
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                env.insert(k.to_string(), v.to_string());
            }
        }
        _ => {}
    }
    env
}

/// The Dockerfile's final-stage ENV overlaid with the compose service's environment.
fn effective_env(d: &Deploy) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = stage_env(&final_stage(&d.dockerfile_text))
        .into_iter()
        .collect();
    env.extend(compose_env(&d.compose["services"]["leuknet"]));
    env
}

fn image_tag_problem(image: &str, what: &str) -> Option<String> {
    let name = image.split('@').next().unwrap_or(image);
    let tag = name
        .rsplit_once(':')
        .map(|(_, t)| t)
        .filter(|t| !t.contains('/'));
    match tag {
        None => Some(format!("{what}: image {image:?} has no tag; pin a version")),
        Some("latest") => Some(format!(
            "{what}: image {image:?} uses :latest; pin a version"
        )),
        Some(t) if !t.chars().any(|c| c.is_ascii_digit()) => Some(format!(
            "{what}: image {image:?} tag {t:?} names no version"
        )),
        _ => None,
    }
}

// ---- checks: Dockerfile ---------------------------------------------------------------------

/// Every COPY/ADD source outside `--from` exists in the build context and is not excluded by
/// .dockerignore; every `--from` names an earlier stage.
fn check_copy_sources(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let all = stages(&d.dockerfile_text);
    for (si, stage) in all.iter().enumerate() {
        let earlier: BTreeSet<String> = all[..si]
            .iter()
            .enumerate()
            .flat_map(|(i, s)| [s.name.clone(), Some(i.to_string())])
            .flatten()
            .collect();
        for i in stage
            .instrs
            .iter()
            .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        {
            let (flags, args) = flags_and_args(&i.rest);
            if let Some(from) = flags.get("from") {
                if !earlier.contains(from) {
                    problems.push(format!(
                        "line {}: COPY --from={from} names no earlier stage ({earlier:?})",
                        i.line
                    ));
                }
                continue;
            }
            if args.len() < 2 {
                problems.push(format!(
                    "line {}: COPY needs a source and a destination",
                    i.line
                ));
                continue;
            }
            for src in &args[..args.len() - 1] {
                let rel = src.trim_start_matches("./");
                if rel.contains(['*', '?', '[']) {
                    problems.push(format!(
                        "line {}: COPY source {src:?} is a glob; name files",
                        i.line
                    ));
                } else if !d.context.join(rel).exists() {
                    problems.push(format!(
                        "line {}: COPY source {src:?} does not exist in the build context {}",
                        i.line,
                        d.context.display()
                    ));
                } else if d.dockerignore.is_excluded(rel) {
                    problems.push(format!(
                        "line {}: COPY source {src:?} is excluded by .dockerignore",
                        i.line
                    ));
                }
            }
        }
    }
    problems
}

/// The final stage runs as a named or numeric user that is not root.
fn check_final_user(d: &Deploy) -> Vec<String> {
    let stage = final_stage(&d.dockerfile_text);
    match stage.instrs.iter().rev().find(|i| i.keyword == "USER") {
        None => vec!["the final stage has no USER, so the server would run as root".into()],
        Some(i) => {
            let user = i.rest.split(':').next().unwrap_or("").trim();
            if user.is_empty() || user == "root" || user == "0" {
                vec![format!("line {}: final USER {:?} is root", i.line, i.rest)]
            } else {
                vec![]
            }
        }
    }
}

/// HEALTHCHECK probes /health/ready on the EXPOSEd port, the one LEUKNET_ADDR listens on.
fn check_healthcheck_and_ports(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let stage = final_stage(&d.dockerfile_text);
    let exposed = exposed_ports(&d.dockerfile_text);
    if exposed.len() != 1 {
        problems.push(format!(
            "the final stage should EXPOSE exactly one port, got {exposed:?}"
        ));
    }
    let port = exposed.first().copied();
    match stage
        .instrs
        .iter()
        .rev()
        .find(|i| i.keyword == "HEALTHCHECK")
    {
        None => problems.push("the final stage has no HEALTHCHECK".into()),
        Some(h) => {
            if !h.rest.contains("/health/ready") {
                problems.push(format!(
                    "line {}: HEALTHCHECK does not probe /health/ready: {}",
                    h.line, h.rest
                ));
            } else if port_in_url(&h.rest, "/health/ready") != port {
                problems.push(format!(
                    "line {}: HEALTHCHECK probes port {:?}, EXPOSE says {port:?}",
                    h.line,
                    port_in_url(&h.rest, "/health/ready")
                ));
            }
        }
    }
    let env: BTreeMap<_, _> = stage_env(&stage).into_iter().collect();
    match env.get("LEUKNET_ADDR") {
        None => problems.push(
            "the final stage sets no LEUKNET_ADDR (the default listens on loopback only)".into(),
        ),
        Some(addr) => match addr.parse::<std::net::SocketAddr>() {
            Ok(a) if !a.ip().is_unspecified() => problems.push(format!(
                "LEUKNET_ADDR={addr} is unreachable from outside the container"
            )),
            Ok(a) if Some(a.port()) != port => problems.push(format!(
                "LEUKNET_ADDR={addr} listens on another port than EXPOSE {port:?}"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("LEUKNET_ADDR={addr}: {e}")),
        },
    }
    problems
}

/// Where the binary and ONNX Runtime land: ENTRYPOINT and LEUKNET_ORT_LIBRARY point into what
/// the final stage copied from earlier stages, and the image carries the same ONNX Runtime
/// version the server is built and tested against (`engine::DEFAULT_ORT_LIBRARY`).
fn check_runtime_paths(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let all = stages(&d.dockerfile_text);
    let Some(stage) = all.last() else {
        return vec!["the Dockerfile has no FROM".into()];
    };
    let copied: Vec<(String, String)> = stage
        .instrs
        .iter()
        .filter(|i| i.keyword == "COPY")
        .filter_map(|i| {
            let (flags, args) = flags_and_args(&i.rest);
            Some((flags.get("from")?.clone(), args.last()?.clone()))
        })
        .collect();
    let lands_in = |path: &str| {
        copied
            .iter()
            .find(|(_, dst)| {
                path == dst.as_str() || (dst.ends_with('/') && path.starts_with(dst.as_str()))
            })
            .map(|(from, _)| from.clone())
    };
    match stage
        .instrs
        .iter()
        .rev()
        .find(|i| i.keyword == "ENTRYPOINT")
    {
        None => problems.push("the final stage has no ENTRYPOINT".into()),
        Some(i) => {
            let argv = words(&i.rest);
            match argv.first() {
                Some(bin) if lands_in(bin).is_some() => {
                    if !bin.ends_with("/leuknet-server") {
                        problems.push(format!("ENTRYPOINT {bin} is not leuknet-server"));
                    }
                }
                other => problems.push(format!(
                    "ENTRYPOINT {other:?} is not a file the final stage copies in ({copied:?})"
                )),
            }
        }
    }
    let env: BTreeMap<_, _> = stage_env(stage).into_iter().collect();
    let want_file = Path::new(leuknet::engine::DEFAULT_ORT_LIBRARY)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default()
        .to_string();
    match env.get("LEUKNET_ORT_LIBRARY") {
        None => problems.push("the final stage sets no LEUKNET_ORT_LIBRARY".into()),
        Some(lib) => {
            if lands_in(lib).is_none() {
                problems.push(format!(
                    "LEUKNET_ORT_LIBRARY={lib} is not under a folder copied from a build stage"
                ));
            }
            if !lib.ends_with(&format!("/{want_file}")) {
                problems.push(format!(
                    "LEUKNET_ORT_LIBRARY={lib} is not {want_file}, the version the server is built against"
                ));
            }
            if let Some(from) = lands_in(lib) {
                let version = all
                    .iter()
                    .find(|s| s.name.as_deref() == Some(from.as_str()))
                    .into_iter()
                    .flat_map(|s| s.instrs.iter())
                    .filter(|i| i.keyword == "ARG")
                    .find_map(|i| i.rest.strip_prefix("ORT_VERSION=").map(str::to_string));
                match version {
                    Some(v) if want_file.ends_with(&format!(".so.{v}")) => {}
                    other => problems.push(format!(
                        "stage {from} installs ORT_VERSION {other:?}, but LEUKNET_ORT_LIBRARY wants {want_file}"
                    )),
                }
            }
        }
    }
    problems
}

/// Every `cargo build --bin NAME` builds a binary that exists, and base images are pinned.
fn check_builds_and_bases(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let all = stages(&d.dockerfile_text);
    let names: BTreeSet<_> = all.iter().filter_map(|s| s.name.clone()).collect();
    for (i, s) in all.iter().enumerate() {
        if !names.contains(&s.image) {
            problems.extend(image_tag_problem(
                &s.image,
                &format!("FROM of stage {}", stage_label(s, i)),
            ));
        }
        for r in s.instrs.iter().filter(|i| i.keyword == "RUN") {
            let toks: Vec<&str> = r.rest.split_whitespace().collect();
            for w in toks.windows(2).filter(|w| w[0] == "--bin") {
                let bin = w[1].trim_end_matches(';');
                if !d.context.join(format!("src/bin/{bin}.rs")).is_file() {
                    problems.push(format!(
                        "line {}: cargo builds --bin {bin}, but src/bin/{bin}.rs is missing",
                        r.line
                    ));
                }
            }
        }
    }
    if !all
        .iter()
        .flat_map(|s| &s.instrs)
        .any(|i| i.keyword == "RUN" && i.rest.contains("--bin leuknet-server"))
    {
        problems.push("no RUN builds --bin leuknet-server".into());
    }
    problems
}

/// Sources the image's `cargo build` does not compile: binaries other than its `--bin` targets,
/// and modules that `src/lib.rs` gates behind a `#[cfg(feature = "...")]` the build leaves off.
fn sources_outside_the_image_build(d: &Deploy) -> Vec<PathBuf> {
    let runs: Vec<String> = stages(&d.dockerfile_text)
        .iter()
        .flat_map(|s| s.instrs.iter())
        .filter(|i| i.keyword == "RUN" && i.rest.contains("cargo build"))
        .map(|i| i.rest.clone())
        .collect();
    let built_bins: BTreeSet<String> = runs
        .iter()
        .flat_map(|r| {
            let toks: Vec<String> = r.split_whitespace().map(str::to_string).collect();
            toks.windows(2)
                .filter(|w| w[0] == "--bin")
                .map(|w| w[1].trim_end_matches(';').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let feature_on = |f: &str| {
        runs.iter().any(|r| {
            r.contains("--all-features")
                || r.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "--features" && w[1].split(',').any(|x| x == f))
        })
    };
    let mut skip = Vec::new();
    if let Ok(entries) = std::fs::read_dir(d.context.join("src/bin")) {
        for e in entries.flatten() {
            let stem = e
                .path()
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("")
                .to_string();
            if !built_bins.contains(&stem) {
                skip.push(e.path());
            }
        }
    }
    let lib = std::fs::read_to_string(d.context.join("src/lib.rs")).unwrap_or_default();
    let lines: Vec<&str> = lib.lines().map(str::trim).collect();
    for w in lines.windows(2) {
        let gate = w[0]
            .strip_prefix("#[cfg(feature = \"")
            .and_then(|r| r.strip_suffix("\")]"));
        let module = w[1]
            .trim_start_matches("pub ")
            .strip_prefix("mod ")
            .and_then(|r| r.strip_suffix(';'));
        if let (Some(feature), Some(module)) = (gate, module) {
            if !feature_on(feature) {
                skip.push(d.context.join(format!("src/{module}.rs")));
                skip.push(d.context.join(format!("src/{module}")));
            }
        }
    }
    skip
}

/// Files that `include_str!`/`include_bytes!` pull into the image's build must reach the
/// builder stage: inside a path the Dockerfile copies and not excluded by .dockerignore.
fn check_included_files(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let skip = sources_outside_the_image_build(d);
    let copied: Vec<PathBuf> = stages(&d.dockerfile_text)
        .iter()
        .flat_map(|s| s.instrs.iter())
        .filter(|i| i.keyword == "COPY")
        .filter_map(|i| {
            let (flags, args) = flags_and_args(&i.rest);
            (!flags.contains_key("from") && args.len() >= 2)
                .then(|| args[..args.len() - 1].to_vec())
        })
        .flatten()
        .map(|s| d.context.join(s.trim_start_matches("./")))
        .collect();
    let mut stack = vec![d.context.join("src")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if skip.iter().any(|s| path.starts_with(s)) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for mac in ["include_str!(", "include_bytes!("] {
                for (at, _) in text.match_indices(mac) {
                    let after = text[at + mac.len()..].trim_start();
                    let Some(lit) = after.strip_prefix('"') else {
                        continue;
                    }; // concat!/env!: OUT_DIR
                    let Some(end) = lit.find('"') else { continue };
                    let target = path.parent().unwrap_or(Path::new(".")).join(&lit[..end]);
                    let shown = format!(
                        "{} includes {:?}",
                        path.strip_prefix(&d.context).unwrap_or(&path).display(),
                        &lit[..end]
                    );
                    let Ok(canon) = target.canonicalize() else {
                        problems.push(format!("{shown}, which does not exist"));
                        continue;
                    };
                    let in_copy = copied
                        .iter()
                        .any(|c| c.canonicalize().is_ok_and(|c| canon.starts_with(c)));
                    let rel = canon
                        .strip_prefix(d.context.canonicalize().unwrap_or_default())
                        .map(|p| p.to_string_lossy().to_string())
                        .unwrap_or_default();
                    if !in_copy {
                        problems.push(format!(
                            "{shown}, which the Dockerfile does not COPY into the builder"
                        ));
                    } else if d.dockerignore.is_excluded(&rel) {
                        problems.push(format!("{shown}, which .dockerignore excludes"));
                    }
                }
            }
        }
    }
    problems
}

// ---- checks: compose and Prometheus ---------------------------------------------------------

/// The leuknet service: its build files, bind mounts, port, GPU, health check and env.
fn check_compose_leuknet(d: &Deploy) -> Vec<String> {
    let mut problems = Vec::new();
    let svc = &d.compose["services"]["leuknet"];
    if svc.is_null() {
        return vec!["docker-compose.yml has no service `leuknet`".into()];
    }
    if !d.context.is_dir() {
        problems.push(format!(
            "build context {} is not a folder",
            d.context.display()
        ));
    }
    let dockerfile = svc["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
    if !d.context.join(dockerfile).is_file() {
        problems.push(format!(
            "build.dockerfile {dockerfile} does not exist in the context"
        ));
    }
    let declared: BTreeSet<String> = d.compose["volumes"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (name, service) in d.compose["services"].as_mapping().into_iter().flatten() {
        let name = name.as_str().unwrap_or("?");
        for (src, dst, _) in volumes(service) {
            if is_bind_source(&src) {
                if !d.compose_dir.join(&src).exists() {
                    problems.push(format!(
                        "service {name}: volume source {src} (for {dst}) does not exist"
                    ));
                }
            } else if !declared.contains(&src) {
                problems.push(format!(
                    "service {name}: named volume {src} is not declared under top-level volumes"
                ));
            }
        }
    }
    // The model folder: a read-only bind of an existing folder where LEUKNET_MODEL_CARD points.
    let env = effective_env(d);
    let card = env.get("LEUKNET_MODEL_CARD").cloned().unwrap_or_default();
    let card_dir = Path::new(&card)
        .parent()
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    match volumes(svc)
        .into_iter()
        .find(|(_, dst, _)| dst.trim_end_matches('/') == card_dir)
    {
        None => problems.push(format!(
            "no volume is mounted at {card_dir:?}, the folder of LEUKNET_MODEL_CARD={card:?}"
        )),
        Some((src, _, ro)) => {
            if !ro {
                problems.push(format!(
                    "the model volume {src} is not mounted read-only (:ro)"
                ));
            }
            if !is_bind_source(&src) || !d.compose_dir.join(&src).is_dir() {
                problems.push(format!(
                    "the model volume source {src} is not a folder in the repository"
                ));
            }
        }
    }
    let exposed = exposed_ports(&d.dockerfile_text);
    let published = published_container_ports(svc);
    if exposed.is_empty() || !exposed.iter().all(|p| published.contains(p)) {
        problems.push(format!(
            "compose publishes container ports {published:?}, the Dockerfile EXPOSEs {exposed:?}"
        ));
    }
    let devices = svc["deploy"]["resources"]["reservations"]["devices"].as_sequence();
    let gpu = devices.into_iter().flatten().any(|dev| {
        dev["driver"].as_str() == Some("nvidia")
            && (dev["count"].as_u64() == Some(1) || dev["count"].as_str() == Some("all"))
            && dev["capabilities"]
                .as_sequence()
                .is_some_and(|c| c.iter().any(|c| c.as_str() == Some("gpu")))
    });
    if !gpu {
        problems.push("deploy.resources.reservations.devices has no {driver: nvidia, count: 1, capabilities: [gpu]}".into());
    }
    let hc = serde_yaml_ng::to_string(&svc["healthcheck"]["test"]).unwrap_or_default();
    match port_in_url(&hc, "/health/ready") {
        None => problems.push(format!(
            "the compose healthcheck does not probe /health/ready: {hc}"
        )),
        Some(p) if !exposed.contains(&p) => problems.push(format!(
            "the compose healthcheck probes port {p}, the server listens on {exposed:?}"
        )),
        Some(_) => {}
    }
    problems.extend(check_leuknet_env(&compose_env(svc), "docker-compose.yml"));
    problems
}

/// The prometheus service: a pinned image, its config mounted where `--config.file` reads it,
/// and that config scraping the leuknet service's published port at /metrics.
fn check_prometheus(d: &Deploy, prometheus_yml: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let svc = &d.compose["services"]["prometheus"];
    let Some(image) = svc["image"].as_str() else {
        return vec!["docker-compose.yml has no service `prometheus` with an image".into()];
    };
    if !image.starts_with("prom/prometheus:") {
        problems.push(format!("prometheus image {image} is not prom/prometheus"));
    }
    problems.extend(image_tag_problem(image, "service prometheus"));
    let args: Vec<String> = match &svc["command"] {
        Value::Sequence(s) => s
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Value::String(s) => words(s),
        _ => vec![],
    };
    let config_in_container = args
        .iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_string))
        .unwrap_or_else(|| "/etc/prometheus/prometheus.yml".into());
    let Some((src, _, _)) = volumes(svc)
        .into_iter()
        .find(|(_, dst, _)| *dst == config_in_container)
    else {
        return vec![format!(
            "nothing is mounted at {config_in_container}, the config Prometheus reads"
        )];
    };
    let text = match prometheus_yml {
        Some(t) => t.to_string(),
        None => match std::fs::read_to_string(d.compose_dir.join(&src)) {
            Ok(t) => t,
            Err(e) => return vec![format!("prometheus config {src}: {e}")],
        },
    };
    let config: Value = match serde_yaml_ng::from_str(&text) {
        Ok(v) => v,
        Err(e) => return vec![format!("prometheus config {src} is not YAML: {e}")],
    };
    let ports = exposed_ports(&d.dockerfile_text);
    let wanted: Vec<String> = ports.iter().map(|p| format!("leuknet:{p}")).collect();
    let scrapes_leuknet = config["scrape_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|job| {
            let path = job["metrics_path"].as_str().unwrap_or("/metrics");
            let scheme = job["scheme"].as_str().unwrap_or("http");
            path == "/metrics"
                && scheme == "http"
                && job["static_configs"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|sc| {
                        sc["targets"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .any(|t| t.as_str().is_some_and(|t| wanted.iter().any(|w| w == t)))
                    })
        });
    if !scrapes_leuknet {
        problems.push(format!(
            "{src}: no scrape job targets {wanted:?} at http /metrics"
        ));
    }
    problems
}

// ---- tests on the repository's files --------------------------------------------------------

#[test]
fn dockerfile_copy_sources_exist_and_are_not_ignored() {
    assert_ok(check_copy_sources(&deploy()));
}

#[test]
fn dockerfile_final_stage_runs_as_non_root() {
    assert_ok(check_final_user(&deploy()));
}

#[test]
fn dockerfile_healthcheck_probes_readiness_on_the_exposed_port() {
    assert_ok(check_healthcheck_and_ports(&deploy()));
}

#[test]
fn dockerfile_entrypoint_and_ort_library_are_copied_in() {
    assert_ok(check_runtime_paths(&deploy()));
}

#[test]
fn dockerfile_builds_existing_binaries_from_pinned_images() {
    assert_ok(check_builds_and_bases(&deploy()));
}

#[test]
fn files_included_by_the_crate_reach_the_docker_build() {
    assert_ok(check_included_files(&deploy()));
}

#[test]
fn dockerfile_env_names_real_server_flags() {
    let d = deploy();
    let env: BTreeMap<_, _> = stage_env(&final_stage(&d.dockerfile_text))
        .into_iter()
        .collect();
    assert!(
        env.contains_key("LEUKNET_MODEL_CARD"),
        "the image should set LEUKNET_MODEL_CARD"
    );
    assert_ok(check_leuknet_env(&env, "Dockerfile"));
    // The merged view (compose overrides the image) must be a valid configuration too.
    assert_ok(check_leuknet_env(
        &effective_env(&d),
        "Dockerfile + docker-compose.yml",
    ));
}

#[test]
fn dockerignore_keeps_build_output_and_native_files_out() {
    let ignore = DockerIgnore::parse(&read(".dockerignore"));
    for path in [
        "target",
        "target/release/leuknet-server",
        ".native/onnxruntime/lib",
        ".venv",
        ".venv-train/bin",
        "bench/.work/fixture/leuknet.onnx",
    ] {
        assert!(
            ignore.is_excluded(path),
            ".dockerignore should exclude {path}"
        );
    }
    for path in [
        "src/lib.rs",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "proto/onnx.proto",
    ] {
        assert!(
            !ignore.is_excluded(path),
            ".dockerignore must not exclude {path}: the build needs it"
        );
    }
}

#[test]
fn compose_leuknet_service_is_consistent() {
    assert_ok(check_compose_leuknet(&deploy()));
}

#[test]
fn compose_prometheus_scrapes_leuknet() {
    assert_ok(check_prometheus(&deploy(), None));
}

/// If Prometheus's own `promtool` is installed (Debian: apt-get install prometheus), it must
/// accept the config too; without it this test only says so on stderr.
#[test]
fn promtool_accepts_the_prometheus_config_when_installed() {
    let config = root().join("deploy/prometheus.yml");
    match std::process::Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&config)
        .output()
    {
        Err(_) => eprintln!("promtool not installed; skipped `promtool check config`"),
        Ok(out) => assert!(
            out.status.success(),
            "promtool check config failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

// ---- the checks catch what they claim (altered copies in memory, files untouched) -----------

fn altered_dockerfile(from: &str, to: &str) -> Deploy {
    let text = read("Dockerfile");
    assert!(
        text.contains(from),
        "the Dockerfile no longer contains {from:?}; update this test"
    );
    deploy_from(
        &read("docker-compose.yml"),
        Some(&text.replacen(from, to, 1)),
    )
}

fn altered_compose(from: &str, to: &str) -> Deploy {
    let text = read("docker-compose.yml");
    assert!(
        text.contains(from),
        "docker-compose.yml no longer contains {from:?}; update this test"
    );
    deploy_from(&text.replacen(from, to, 1), None)
}

#[test]
fn copy_check_rejects_missing_ignored_and_unknown_sources() {
    let d = altered_dockerfile("COPY proto/ proto/", "COPY protos/ proto/");
    assert_reports(check_copy_sources(&d), "\"protos/\" does not exist");
    let d = altered_dockerfile("COPY proto/ proto/", "COPY target/ proto/");
    assert_reports(check_copy_sources(&d), "excluded by .dockerignore");
    let d = altered_dockerfile("COPY --from=ort", "COPY --from=onnx");
    assert_reports(check_copy_sources(&d), "--from=onnx names no earlier stage");
}

#[test]
fn user_check_rejects_root_and_a_missing_user() {
    assert_reports(
        check_final_user(&altered_dockerfile("USER 10001:10001", "USER root")),
        "is root",
    );
    assert_reports(
        check_final_user(&altered_dockerfile("USER 10001:10001", "USER 0:0")),
        "is root",
    );
    assert_reports(
        check_final_user(&altered_dockerfile("USER 10001:10001", "")),
        "no USER",
    );
}

#[test]
fn healthcheck_check_rejects_wrong_route_port_and_address() {
    let d = altered_dockerfile("8080/health/ready", "8080/health/live");
    assert_reports(
        check_healthcheck_and_ports(&d),
        "does not probe /health/ready",
    );
    let d = altered_dockerfile("8080/health/ready", "8081/health/ready");
    assert_reports(check_healthcheck_and_ports(&d), "probes port Some(8081)");
    let d = altered_dockerfile("EXPOSE 8080", "EXPOSE 9000");
    assert_reports(check_healthcheck_and_ports(&d), "EXPOSE says Some(9000)");
    let d = altered_dockerfile("LEUKNET_ADDR=0.0.0.0:8080", "LEUKNET_ADDR=127.0.0.1:8080");
    assert_reports(check_healthcheck_and_ports(&d), "unreachable from outside");
}

#[test]
fn runtime_path_check_rejects_mismatched_ort_and_entrypoint() {
    let d = altered_dockerfile("libonnxruntime.so.1.31.1 \\", "libonnxruntime.so.1.30.0 \\");
    assert_reports(
        check_runtime_paths(&d),
        "the version the server is built against",
    );
    let d = altered_dockerfile("ARG ORT_VERSION=1.31.1", "ARG ORT_VERSION=1.32.0");
    assert_reports(
        check_runtime_paths(&d),
        "installs ORT_VERSION Some(\"1.32.0\")",
    );
    let d = altered_dockerfile(
        "ENTRYPOINT [\"/opt/leuknet/bin/leuknet-server\"]",
        "ENTRYPOINT [\"/usr/local/bin/leuknet-server\"]",
    );
    assert_reports(
        check_runtime_paths(&d),
        "is not a file the final stage copies in",
    );
}

#[test]
fn include_check_rejects_an_embedded_file_left_out_of_the_build() {
    let d = altered_dockerfile("COPY openapi.yaml ./\n", "");
    assert_reports(
        check_included_files(&d),
        "includes \"../../openapi.yaml\", which the Dockerfile does not COPY",
    );
}

#[test]
fn include_check_scans_only_what_the_image_compiles() {
    let d = deploy();
    let skip = sources_outside_the_image_build(&d);
    let bench_raw = root().join("src/bin/leuknet-bench-raw.rs");
    assert!(
        skip.contains(&bench_raw),
        "{skip:?} should hold {}",
        bench_raw.display()
    );
    assert!(!skip.contains(&root().join("src/bin/leuknet-server.rs")));
    if read("src/lib.rs").contains("#[cfg(feature = \"train\")]") {
        assert!(skip.contains(&root().join("src/train")), "{skip:?}");
        let d = altered_dockerfile(
            "--locked --bin leuknet-server \\",
            "--locked --features train --bin leuknet-server \\",
        );
        assert!(!sources_outside_the_image_build(&d).contains(&root().join("src/train")));
    }
}

#[test]
fn build_check_rejects_unknown_bins_and_unpinned_images() {
    let d = altered_dockerfile(
        "--locked --bin leuknet-server \\",
        "--locked --bin leuknet-serve \\",
    );
    assert_reports(
        check_builds_and_bases(&d),
        "src/bin/leuknet-serve.rs is missing",
    );
    let d = altered_dockerfile("FROM python:3.12-slim-bookworm", "FROM python:latest");
    assert_reports(check_builds_and_bases(&d), "uses :latest");
}

#[test]
fn env_check_rejects_unknown_flags_and_bad_values() {
    let env = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    assert_reports(
        check_leuknet_env(&env("LEUKNET_MODEL", "/m.json"), "t"),
        "LEUKNET_MODEL is not",
    );
    assert_reports(
        check_leuknet_env(&env("LEUKNET_LOG_FORMAT", "jsn"), "t"),
        "not a valid server configuration",
    );
    assert_reports(
        check_leuknet_env(&env("LEUKNET_ADDR", "0.0.0.0"), "t"),
        "not a valid server configuration",
    );
    let d = altered_dockerfile("LEUKNET_DEVICE=auto", "LEUKNET_DEVICES=auto");
    let env: BTreeMap<_, _> = stage_env(&final_stage(&d.dockerfile_text))
        .into_iter()
        .collect();
    assert_reports(
        check_leuknet_env(&env, "Dockerfile"),
        "LEUKNET_DEVICES is not",
    );
}

#[test]
fn compose_check_rejects_missing_sources_writable_models_and_no_gpu() {
    let d = altered_compose("- ./models:/models:ro", "- ./model:/models:ro");
    assert_reports(
        check_compose_leuknet(&d),
        "volume source ./model (for /models) does not exist",
    );
    let d = altered_compose("- ./models:/models:ro", "- ./models:/models");
    assert_reports(check_compose_leuknet(&d), "not mounted read-only");
    let d = altered_compose("capabilities: [gpu]", "capabilities: [utility]");
    assert_reports(check_compose_leuknet(&d), "has no {driver: nvidia");
    let d = altered_compose("\"8080:8080\"", "\"8080:80\"");
    assert_reports(check_compose_leuknet(&d), "publishes container ports [80]");
    let d = altered_compose("dockerfile: Dockerfile", "dockerfile: Dockerfile.gpu");
    assert_reports(check_compose_leuknet(&d), "Dockerfile.gpu does not exist");
    let d = altered_compose("LEUKNET_DEVICE: cuda", "LEUKNET_DEVICE: gpu");
    assert_reports(
        check_compose_leuknet(&d),
        "not a valid server configuration",
    );
    let d = altered_compose("- prometheus-data:/prometheus", "- promdata:/prometheus");
    assert_reports(
        check_compose_leuknet(&d),
        "named volume promdata is not declared",
    );
}

#[test]
fn prometheus_check_rejects_wrong_target_mount_and_tag() {
    let d = deploy();
    let cfg = read("deploy/prometheus.yml");
    assert_reports(
        check_prometheus(&d, Some(&cfg.replace("leuknet:8080", "leuknet:9090"))),
        "no scrape job targets [\"leuknet:8080\"]",
    );
    assert_reports(
        check_prometheus(
            &d,
            Some(&cfg.replace("metrics_path: /metrics", "metrics_path: /stats")),
        ),
        "no scrape job targets",
    );
    let d = altered_compose("prom/prometheus:v3.5.0", "prom/prometheus:latest");
    assert_reports(check_prometheus(&d, None), "uses :latest");
    let d = altered_compose(
        "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
        "./deploy/prometheus.yml:/etc/prom.yml:ro",
    );
    assert_reports(
        check_prometheus(&d, None),
        "nothing is mounted at /etc/prometheus/prometheus.yml",
    );
}

#[test]
fn dockerignore_matcher_follows_docker_rules() {
    let ig =
        DockerIgnore::parse("target\n**/*.onnx\n.venv*\nmodels\n!models/keep.json\n# comment\n");
    assert!(ig.is_excluded("target/debug/x"));
    assert!(!ig.is_excluded("src/target.rs"));
    assert!(ig.is_excluded("tests/data/m.onnx"));
    assert!(ig.is_excluded("m.onnx"));
    assert!(ig.is_excluded(".venv-train"));
    assert!(ig.is_excluded("models/leuknet.json"));
    assert!(!ig.is_excluded("models/keep.json"));
    assert!(!ig.is_excluded("src/lib.rs"));
}

#[test]
fn dockerfile_parser_joins_continuations_and_skips_comments() {
    let s = stages("# c\nFROM a:1 AS one\nRUN x \\\n  # inner\n  y\nFROM one\nENV A=1 \\\n    B=\"two words\"\nUSER 7\n");
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].name.as_deref(), Some("one"));
    assert_eq!(s[0].instrs[0].rest, "x    y");
    assert_eq!(s[1].image, "one");
    assert_eq!(
        stage_env(&s[1]),
        vec![("A".into(), "1".into()), ("B".into(), "two words".into())]
    );
}
