//! Classify request parsing (`leuknet::http::classify::split_body`, the body-splitting part of
//! `POST /v1/classify`) on arbitrary input: the first line is the Content-Type header, the rest
//! the body. Any panic or hang is a finding; on success there are 1..=MAX_IMAGES uploads, and
//! identifiers that were set are valid.
#![no_main]

use leuknet::http::classify::split_body;
use leuknet::http::identifiers::Identifiers;
use libfuzzer_sys::fuzz_target;

const MAX_IMAGES: usize = 4;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let content_type = String::from_utf8_lossy(head);
    let mut ids = Identifiers::default();
    let body = bytes::Bytes::copy_from_slice(body);
    let result = futures::executor::block_on(split_body(&content_type, body, &mut ids, MAX_IMAGES));
    if let Ok(uploads) = result {
        assert!(!uploads.is_empty() && uploads.len() <= MAX_IMAGES);
        for id in [&ids.accession_id, &ids.specimen_id].into_iter().flatten() {
            assert!((1..=64).contains(&id.len()), "{id:?}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b)));
        }
    }
});
