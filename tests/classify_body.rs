//! `split_body`, the body-splitting part of `POST /v1/classify` (also the fuzz target
//! `fuzz/fuzz_targets/classify_body.rs`), without a server: raw bodies, multipart forms,
//! identifiers, limits and malformed forms.

use bytes::Bytes;
use leuknet::http::classify::split_body;
use leuknet::http::error::ApiError;
use leuknet::http::identifiers::Identifiers;

fn form(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, content) in parts {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = filename {
            out.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// The uploads as (bytes, file name), or the error; and the identifiers set.
type Split = (
    Result<Vec<(Vec<u8>, Option<String>)>, ApiError>,
    Identifiers,
);

fn split(content_type: &str, body: &[u8], max: usize) -> Split {
    let mut ids = Identifiers::default();
    let result = futures::executor::block_on(split_body(
        content_type,
        Bytes::copy_from_slice(body),
        &mut ids,
        max,
    ))
    .map(|uploads| {
        uploads
            .into_iter()
            .map(|u| (u.bytes.to_vec(), u.filename))
            .collect()
    });
    (result, ids)
}

#[test]
fn a_raw_body_is_one_upload() {
    let (r, ids) = split("image/png", b"\x89PNG...", 4);
    assert_eq!(r.unwrap(), vec![(b"\x89PNG...".to_vec(), None)]);
    assert_eq!(ids, Identifiers::default());
}

#[test]
fn multipart_gives_each_image_part_in_order_with_identifiers() {
    let body = form(
        "xyz",
        &[
            ("accession_id", None, b"A-1"),
            ("image", Some("a.png"), b"first"),
            ("note", None, b"ignored"),
            ("image", None, b"second"),
            ("specimen_id", None, b"S.2"),
        ],
    );
    let (r, ids) = split("Multipart/Form-Data; boundary=\"xyz\"", &body, 4);
    assert_eq!(
        r.unwrap(),
        vec![
            (b"first".to_vec(), Some("a.png".to_string())),
            (b"second".to_vec(), None)
        ]
    );
    assert_eq!(ids.accession_id.as_deref(), Some("A-1"));
    assert_eq!(ids.specimen_id.as_deref(), Some("S.2"));
}

#[test]
fn limits_and_malformed_forms_are_refused() {
    let five: Vec<(&str, Option<&str>, &[u8])> =
        (0..5).map(|_| ("image", None, &b"x"[..])).collect();
    let (r, _) = split("multipart/form-data; boundary=b", &form("b", &five), 4);
    assert!(
        matches!(r, Err(ApiError::TooManyImages { count: 5, limit: 4 })),
        "{r:?}"
    );

    let (r, _) = split(
        "multipart/form-data; boundary=b",
        &form("b", &[("file", None, b"x")]),
        4,
    );
    assert!(matches!(r, Err(ApiError::MissingImage)), "{r:?}");

    let bad_id = form(
        "b",
        &[("accession_id", None, b"has space"), ("image", None, b"x")],
    );
    let (r, _) = split("multipart/form-data; boundary=b", &bad_id, 4);
    assert!(matches!(r, Err(ApiError::InvalidIdentifier(_))), "{r:?}");

    let one = form("b", &[("image", None, b"x")]);
    let (r, _) = split("multipart/form-data", &one, 4);
    assert!(
        matches!(r, Err(ApiError::BadRequest(_))),
        "no boundary: {r:?}"
    );
    let (r, _) = split("multipart/form-data; boundary=b", &one[..one.len() - 12], 4);
    assert!(
        matches!(r, Err(ApiError::BadRequest(_))),
        "truncated: {r:?}"
    );
    let (r, _) = split("multipart/form-data; boundary=b", b"", 4);
    assert!(r.is_err(), "empty: {r:?}");
}
