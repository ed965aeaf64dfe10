//! Optional API keys: `--api-keys-file PATH` (`LEUKNET_API_KEYS_FILE`) and/or `--api-keys`
//! (`LEUKNET_API_KEYS`). Each entry is `name:sha256hex`, the sha256 of the key in lowercase or
//! uppercase hex (`printf %s "$KEY" | sha256sum`); in the file one per line, `#` starts a
//! comment; in the flag entries are separated by commas. The server never holds a key itself,
//! only its hash.
//!
//! When keys are configured, every request except the health checks (`/health/*`), `/metrics`
//! and the web page with its assets (`/`, `/assets/*`) needs `Authorization: Bearer <key>`. The
//! presented key is hashed and compared with every stored hash in constant time, without an early
//! exit, so the answer time does not tell which hash, or how much of one, matched. A missing or
//! wrong key gets 401 `unauthorized` with `WWW-Authenticate: Bearer`. The key's name (never the
//! key) is recorded in the request's log span as `api_key`.

use super::error::ApiError;
use super::AppState;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The configured keys: names and the sha256 of each key.
#[derive(Clone)]
pub struct ApiKeys {
    names: Vec<String>,
    hashes: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: hashes stay out of every log and debug print.
        f.debug_struct("ApiKeys")
            .field("names", &self.names)
            .finish()
    }
}

/// The identity a request authenticated as, in its extensions.
#[derive(Debug, Clone)]
pub struct ApiKeyName(pub String);

impl ApiKeys {
    /// Parses `name:sha256hex` entries separated by newlines (and, for the flag, commas).
    /// `#` starts a comment; blank entries are skipped. `source` names where they came from in
    /// error messages, which quote line numbers and never the entry itself.
    pub fn parse(text: &str, source: &str, separators: &[char]) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys {
            names: Vec::new(),
            hashes: Vec::new(),
        };
        keys.add(text, source, separators)?;
        Ok(keys)
    }

    fn add(&mut self, text: &str, source: &str, separators: &[char]) -> Result<(), String> {
        for (n, entry) in text.split(|c| separators.contains(&c)).enumerate() {
            let entry = entry.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let at = format!("{source}, entry {}", n + 1);
            let (name, hex_hash) = entry
                .split_once(':')
                .ok_or_else(|| format!("{at}: expected name:sha256hex"))?;
            let (name, hex_hash) = (name.trim(), hex_hash.trim());
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(format!(
                    "{at}: the name must be 1-64 characters from [A-Za-z0-9._-]"
                ));
            }
            let mut hash = [0u8; 32];
            if hex_hash.len() != 64 || hex::decode_to_slice(hex_hash, &mut hash).is_err() {
                return Err(format!(
                    "{at}: the hash must be 64 hex digits, the sha256 of the key \
                     (printf %s \"$KEY\" | sha256sum)"
                ));
            }
            if self.names.iter().any(|n| n == name) {
                return Err(format!("{at}: the name {name} is given twice"));
            }
            if self.hashes.contains(&hash) {
                return Err(format!("{at}: the same key is given twice"));
            }
            self.names.push(name.to_string());
            self.hashes.push(hash);
        }
        Ok(())
    }

    /// The keys of `--api-keys-file` and `--api-keys` together; None when neither is given.
    pub fn load(file: Option<&Path>, inline: Option<&str>) -> Result<Option<ApiKeys>, String> {
        if file.is_none() && inline.is_none() {
            return Ok(None);
        }
        let mut keys = ApiKeys {
            names: Vec::new(),
            hashes: Vec::new(),
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the API keys file {}: {e}", path.display()))?;
            keys.add(&text, &path.display().to_string(), &['\n'])?;
        }
        if let Some(inline) = inline {
            keys.add(inline, "--api-keys", &['\n', ','])?;
        }
        if keys.names.is_empty() {
            return Err(
                "API keys are configured but none is given: every protected route \
                        would refuse every request"
                    .into(),
            );
        }
        Ok(Some(keys))
    }

    /// The key names, for the start-up log.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The name of the key `presented` is, or None. The presented key is hashed, then compared
    /// with every stored hash in constant time; no comparison stops early and every stored hash
    /// is visited whatever matched.
    pub fn verify(&self, presented: &[u8]) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, stored) in self.hashes.iter().enumerate() {
            let eq = stored.ct_eq(&digest);
            index = u32::conditional_select(&index, &(i as u32), eq);
            found |= eq;
        }
        bool::from(found).then(|| self.names[index as usize].as_str())
    }
}

/// Routes anyone may call even when keys are configured: health checks (for the orchestrator),
/// metrics (for the scraper) and the web page with its assets.
pub fn is_open(path: &str) -> bool {
    path == "/"
        || path == "/metrics"
        || path.starts_with("/health/")
        || path.starts_with("/assets/")
}

/// The middleware: passes open routes and requests with a valid bearer key, answers the rest
/// 401 `unauthorized`.
pub async fn require(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let Some(keys) = state.api_keys.as_ref() else {
        return next.run(req).await;
    };
    if is_open(req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(token) = presented else {
        return ApiError::Unauthorized(
            "this route needs an API key: send `Authorization: Bearer <key>`".into(),
        )
        .into_response();
    };
    match keys.verify(token.as_bytes()) {
        Some(name) => {
            tracing::Span::current().record("api_key", name);
            req.extensions_mut().insert(ApiKeyName(name.to_string()));
            next.run(req).await
        }
        None => ApiError::Unauthorized("the API key is not valid".into()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    #[test]
    fn parses_names_hashes_and_comments_and_verifies() {
        let text = format!(
            "# lab keys\n\nlab-a:{}\n  lab_b : {}  # the second lab\n",
            sha("secret-a"),
            sha("secret-b").to_uppercase()
        );
        let keys = ApiKeys::parse(&text, "keys", &['\n']).unwrap();
        assert_eq!(keys.names(), ["lab-a", "lab_b"]);
        assert_eq!(keys.verify(b"secret-a"), Some("lab-a"));
        assert_eq!(keys.verify(b"secret-b"), Some("lab_b"));
        assert_eq!(keys.verify(b"secret-c"), None);
        assert_eq!(keys.verify(b""), None);
        assert!(!format!("{keys:?}").contains(&sha("secret-a")));
    }

    #[test]
    fn rejects_bad_entries_without_quoting_them() {
        let h = sha("k");
        for (text, needle) in [
            ("nocolon".to_string(), "expected name:sha256hex"),
            (format!(":{h}"), "the name must be"),
            (format!("a b:{h}"), "the name must be"),
            ("a:abc".to_string(), "64 hex digits"),
            (format!("a:{}", "zz".repeat(32)), "64 hex digits"),
            (format!("a:{h}\na:{}", sha("j")), "given twice"),
            (format!("a:{h}\nb:{h}"), "the same key is given twice"),
        ] {
            let e = ApiKeys::parse(&text, "f", &['\n']).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains(&h), "{e} quotes the hash");
        }
    }

    #[test]
    fn load_joins_file_and_flag_and_refuses_an_empty_set() {
        assert!(ApiKeys::load(None, None).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, format!("a:{}\n", sha("ka"))).unwrap();
        let inline = format!("b:{},c:{}", sha("kb"), sha("kc"));
        let keys = ApiKeys::load(Some(&file), Some(&inline)).unwrap().unwrap();
        assert_eq!(keys.names(), ["a", "b", "c"]);
        assert_eq!(keys.verify(b"kc"), Some("c"));
        std::fs::write(&file, "# nothing yet\n").unwrap();
        assert!(ApiKeys::load(Some(&file), None)
            .unwrap_err()
            .contains("none is given"));
        assert!(ApiKeys::load(Some(&dir.path().join("missing")), None).is_err());
    }

    #[test]
    fn open_routes_are_health_metrics_and_the_page() {
        for p in [
            "/",
            "/metrics",
            "/health/live",
            "/health/ready",
            "/assets/app.js",
        ] {
            assert!(is_open(p), "{p}");
        }
        for p in [
            "/v1/classify",
            "/v1/models",
            "/openapi.yaml",
            "/metrics/x",
            "/healthz",
            "/x",
        ] {
            assert!(!is_open(p), "{p}");
        }
    }
}
