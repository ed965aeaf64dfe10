//! `openapi.yaml` and the router must agree: the same paths and methods, the same status codes
//! per route, the same error codes; and every documented route answers on the real server.

mod common;

use common::*;
use leuknet::http::{error::ERROR_CODES, ROUTES};
use std::collections::BTreeSet;

fn spec() -> serde_yaml_ng::Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).expect("openapi.yaml parses")
}

fn documented() -> BTreeSet<(String, String, Vec<u16>)> {
    let spec = spec();
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_mapping().unwrap() {
        for (method, op) in item.as_mapping().unwrap() {
            let mut statuses: Vec<u16> = op["responses"]
                .as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().parse().unwrap())
                .collect();
            statuses.sort();
            out.insert((
                method.as_str().unwrap().to_uppercase(),
                path.as_str().unwrap().to_string(),
                statuses,
            ));
        }
    }
    out
}

#[test]
fn routes_methods_and_statuses_match_the_router_table() {
    let from_router: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| {
            let mut s = r.statuses.to_vec();
            s.sort();
            (r.method.to_string(), r.path.to_string(), s)
        })
        .collect();
    assert_eq!(documented(), from_router);
}

#[test]
fn error_codes_match() {
    let spec = spec();
    let documented: BTreeSet<String> = spec["components"]["schemas"]["Error"]["properties"]
        ["error"]["properties"]["code"]["enum"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let codes: BTreeSet<String> = ERROR_CODES.iter().map(|(c, _)| c.to_string()).collect();
    assert_eq!(documented, codes);
    // Every error status of /v1/classify's codes is documented on that route.
    let classify = ROUTES.iter().find(|r| r.path == "/v1/classify").unwrap();
    for (code, status) in ERROR_CODES {
        if !["not_found", "method_not_allowed", "not_ready"].contains(code) {
            assert!(
                classify.statuses.contains(status),
                "{code} -> {status} not on /v1/classify"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_and_others_are_not() {
    let server = Server::start(&fixture_card(16), &[]).await;
    for (method, path, statuses) in documented() {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = server
            .client
            .request(m, server.url(&path))
            .send()
            .await
            .unwrap();
        let got = resp.status().as_u16();
        assert!(got != 404 && got != 405, "{method} {path} answered {got}");
        assert!(
            statuses.contains(&got),
            "{method} {path} answered undocumented {got}"
        );
        // A method the document does not list for this path gets 405.
        let other = if method == "GET" {
            reqwest::Method::DELETE
        } else {
            reqwest::Method::GET
        };
        let resp = server
            .client
            .request(other.clone(), server.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{other} {path}");
    }
}
