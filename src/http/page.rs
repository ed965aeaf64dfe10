//! The clinician's web page: `GET /` and its two assets, all embedded in the binary (no CDN, no
//! external fonts: clinics may be offline). The page calls `GET /v1/models` and
//! `POST /v1/classify?explain=true` with `fetch` and renders each result.
//!
//! Every response carries a strict Content-Security-Policy (no inline script or style) and
//! `Referrer-Policy: no-referrer`. The HTML references the assets with `?v=<content hash>`, so
//! the assets can be cached for a year while the HTML is revalidated on each load (ETag).

use crate::model_card::sha256_hex;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;

/// The page's Content-Security-Policy, on the HTML and the assets.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// Path of the script.
pub const APP_JS_PATH: &str = "/assets/app.js";
/// Path of the style sheet.
pub const APP_CSS_PATH: &str = "/assets/app.css";

const INDEX_TEMPLATE: &str = include_str!("page/index.html");
/// The page's script.
pub const APP_JS: &str = include_str!("page/app.js");
/// The page's style sheet.
pub const APP_CSS: &str = include_str!("page/app.css");

const VERSION_PLACEHOLDER: &str = "__ASSET_VERSION__";
const HTML_CACHE: &str = "no-cache";
const ASSET_CACHE: &str = "public, max-age=31536000, immutable";

/// One embedded resource, ready to serve.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    etag: HeaderValue,
}

fn etag_of(body: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\"", &sha256_hex(body.as_bytes())[..32]))
        .expect("hex etag is a valid header value")
}

/// First 16 hex digits of the sha256 of both assets: changes whenever either does.
fn asset_version() -> String {
    sha256_hex(format!("{APP_JS}\0{APP_CSS}").as_bytes())[..16].to_string()
}

static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    let body: &'static str = INDEX_TEMPLATE
        .replace(VERSION_PLACEHOLDER, &asset_version())
        .leak();
    Asset {
        body,
        content_type: "text/html; charset=utf-8",
        cache_control: HTML_CACHE,
        etag: etag_of(body),
    }
});

static JS: LazyLock<Asset> = LazyLock::new(|| Asset {
    body: APP_JS,
    content_type: "text/javascript; charset=utf-8",
    cache_control: ASSET_CACHE,
    etag: etag_of(APP_JS),
});

static CSS: LazyLock<Asset> = LazyLock::new(|| Asset {
    body: APP_CSS,
    content_type: "text/css; charset=utf-8",
    cache_control: ASSET_CACHE,
    etag: etag_of(APP_CSS),
});

/// The HTML as served (asset version filled in).
pub fn index_html() -> &'static str {
    INDEX.body
}

fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "*" || t.trim() == asset.etag)
        });
    let common = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(asset.cache_control),
        ),
        (header::ETAG, asset.etag.clone()),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if not_modified {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        )],
        asset.body,
    )
        .into_response()
}

/// `GET /`: the clinician's page.
pub async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

/// `GET /assets/app.js`.
pub async fn app_js(headers: HeaderMap) -> Response {
    serve(&JS, &headers)
}

/// `GET /assets/app.css`.
pub async fn app_css(headers: HeaderMap) -> Response {
    serve(&CSS, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ERROR_CODES;

    async fn get(path: &str, headers: HeaderMap) -> Response {
        match path {
            "/" => index(headers).await,
            APP_JS_PATH => app_js(headers).await,
            APP_CSS_PATH => app_css(headers).await,
            other => panic!("no page route {other}"),
        }
    }

    fn header(r: &Response, name: header::HeaderName) -> &str {
        r.headers()
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn content_types_and_security_headers() {
        for (path, ct, cache) in [
            ("/", "text/html; charset=utf-8", HTML_CACHE),
            (APP_JS_PATH, "text/javascript; charset=utf-8", ASSET_CACHE),
            (APP_CSS_PATH, "text/css; charset=utf-8", ASSET_CACHE),
        ] {
            let r = get(path, HeaderMap::new()).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header(&r, header::CONTENT_TYPE), ct, "{path}");
            assert_eq!(
                header(&r, header::CONTENT_SECURITY_POLICY),
                "default-src 'none'; script-src 'self'; style-src 'self'; \
                 img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; \
                 frame-ancestors 'none'; base-uri 'none'",
                "{path}"
            );
            assert_eq!(header(&r, header::REFERRER_POLICY), "no-referrer");
            assert_eq!(header(&r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            assert_eq!(header(&r, header::CACHE_CONTROL), cache, "{path}");
            assert!(header(&r, header::ETAG).starts_with('"'));
        }
    }

    #[tokio::test]
    async fn etag_revalidation_answers_304() {
        for path in ["/", APP_JS_PATH, APP_CSS_PATH] {
            let first = get(path, HeaderMap::new()).await;
            let etag = first.headers()[header::ETAG].clone();
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, etag);
            let again = get(path, h).await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
            assert!(again
                .headers()
                .get(header::CONTENT_SECURITY_POLICY)
                .is_some());
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
            assert_eq!(get(path, h).await.status(), StatusCode::OK, "{path}");
        }
    }

    /// Each opening tag of `html` (`<name ...>`), lower-cased, comments skipped.
    fn tags(html: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = html;
        while let Some(i) = rest.find('<') {
            rest = &rest[i..];
            if rest.starts_with("<!--") {
                let end = rest.find("-->").expect("closed comment");
                rest = &rest[end + 3..];
                continue;
            }
            let end = rest.find('>').expect("closed tag");
            out.push(rest[..=end].to_ascii_lowercase());
            rest = &rest[end + 1..];
        }
        out
    }

    /// Attribute names of one tag (`<a b="c" d>` -> [b, d]).
    fn attribute_names(tag: &str) -> Vec<String> {
        let inner = tag.trim_start_matches('<').trim_end_matches('>');
        let mut names = Vec::new();
        let mut chars = inner.chars().peekable();
        // Skip the element name.
        while chars.peek().is_some_and(|c| !c.is_whitespace()) {
            chars.next();
        }
        loop {
            while chars.peek().is_some_and(|c| c.is_whitespace() || *c == '/') {
                chars.next();
            }
            let mut name = String::new();
            while chars
                .peek()
                .is_some_and(|c| !c.is_whitespace() && *c != '=' && *c != '/')
            {
                name.push(chars.next().unwrap());
            }
            if name.is_empty() {
                break;
            }
            names.push(name);
            if chars.peek() == Some(&'=') {
                chars.next();
                match chars.peek().copied() {
                    Some(q @ ('"' | '\'')) => {
                        chars.next();
                        for c in chars.by_ref() {
                            if c == q {
                                break;
                            }
                        }
                    }
                    _ => {
                        while chars.peek().is_some_and(|c| !c.is_whitespace()) {
                            chars.next();
                        }
                    }
                }
            }
        }
        names
    }

    #[test]
    fn html_has_no_inline_script_style_or_event_handlers() {
        let html = index_html();
        assert!(!html.contains(VERSION_PLACEHOLDER));
        let tags = tags(html);
        assert!(tags.len() > 20, "parsed {} tags", tags.len());
        let scripts: Vec<&String> = tags.iter().filter(|t| t.starts_with("<script")).collect();
        assert_eq!(scripts.len(), 1, "{scripts:?}");
        for t in &scripts {
            assert!(
                attribute_names(t).contains(&"src".to_string()),
                "script without src: {t}"
            );
        }
        // A script element has nothing between its tags.
        assert!(html.contains("\"></script>") || html.contains(" defer></script>"));
        assert!(
            !tags.iter().any(|t| t.starts_with("<style")),
            "<style> element"
        );
        for t in &tags {
            for a in attribute_names(t) {
                assert!(a != "style", "inline style attribute in {t}");
                assert!(!a.starts_with("on"), "inline event handler {a} in {t}");
            }
            assert!(!t.contains("javascript:"), "javascript: URL in {t}");
        }
        // Nothing from elsewhere: every URL is relative to this server, data: or a fragment.
        for t in &tags {
            for attr in ["src=\"", "href=\""] {
                if let Some(i) = t.find(attr) {
                    let url = &t[i + attr.len()..];
                    assert!(
                        url.starts_with('/') || url.starts_with('#') || url.starts_with("data:"),
                        "external reference in {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn html_links_the_versioned_assets_and_carries_the_disclaimer() {
        let html = index_html();
        let v = asset_version();
        assert!(html.contains(&format!("src=\"{APP_JS_PATH}?v={v}\"")));
        assert!(html.contains(&format!("href=\"{APP_CSS_PATH}?v={v}\"")));
        assert!(html.contains("Research use only"));
        assert!(html.contains("aria-live=\"polite\""));
        assert!(html.contains("type=\"file\"") && html.contains(" multiple"));
    }

    #[test]
    fn assets_load_nothing_from_elsewhere() {
        for (name, text) in [("app.js", APP_JS), ("app.css", APP_CSS)] {
            for bad in [
                "http://",
                "https://",
                "@import",
                "url(",
                "eval(",
                "innerHTML",
            ] {
                assert!(!text.contains(bad), "{name} contains {bad:?}");
            }
        }
        assert!(!APP_JS.contains("setAttribute('style'"));
        assert!(!APP_JS.contains("new Function"));
    }

    #[test]
    fn script_explains_every_api_error_code() {
        for (code, _) in ERROR_CODES {
            assert!(
                APP_JS.contains(&format!("    {code}: ")),
                "app.js has no plain-language line for {code}"
            );
        }
        assert!(APP_JS.contains("retry-after"));
        assert!(APP_JS.contains("/v1/classify?explain=true"));
        assert!(APP_JS.contains("/v1/models"));
    }
}
