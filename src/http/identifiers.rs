//! The lab's request identifiers on `POST /v1/classify`: `accession_id` and `specimen_id`,
//! as multipart text fields of those names or as the headers `X-Accession-Id` /
//! `X-Specimen-Id` (the only way for a raw image body). Each is 1 to 64 characters from
//! `[A-Za-z0-9._:/-]`, safe to write into logs, the audit log and FHIR identifiers. The same
//! identifier given twice (header and field, or two fields) must carry the same value.

use super::error::ApiError;
use axum::http::HeaderMap;

/// Header carrying the accession number.
pub const ACCESSION_HEADER: &str = "x-accession-id";
/// Header carrying the specimen identifier.
pub const SPECIMEN_HEADER: &str = "x-specimen-id";
/// Multipart field carrying the accession number.
pub const ACCESSION_FIELD: &str = "accession_id";
/// Multipart field carrying the specimen identifier.
pub const SPECIMEN_FIELD: &str = "specimen_id";
/// Longest identifier, in characters.
pub const MAX_LEN: usize = 64;

/// The identifiers of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    pub accession_id: Option<String>,
    pub specimen_id: Option<String>,
}

/// True for 1 to [`MAX_LEN`] characters from `[A-Za-z0-9._:/-]`.
pub fn is_valid(value: &str) -> bool {
    (1..=MAX_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

fn check(name: &str, value: &str) -> Result<(), ApiError> {
    if is_valid(value) {
        return Ok(());
    }
    let why = if value.is_empty() {
        "it is empty".to_string()
    } else if value.chars().count() > MAX_LEN {
        format!("it has {} characters", value.chars().count())
    } else {
        "it has a character outside that set".to_string()
    };
    Err(ApiError::InvalidIdentifier(format!(
        "{name} must be 1 to {MAX_LEN} characters from A-Z a-z 0-9 . _ : / - ({why})"
    )))
}

impl Identifiers {
    /// The identifiers from the `X-Accession-Id` / `X-Specimen-Id` headers.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut ids = Self::default();
        for (header, field) in [
            (ACCESSION_HEADER, ACCESSION_FIELD),
            (SPECIMEN_HEADER, SPECIMEN_FIELD),
        ] {
            for value in headers.get_all(header) {
                let value = value.to_str().map_err(|_| {
                    ApiError::InvalidIdentifier(format!(
                        "{header} must be 1 to {MAX_LEN} characters from A-Z a-z 0-9 . _ : / - \
                         (it is not visible ASCII)"
                    ))
                })?;
                ids.set(field, value)?;
            }
        }
        Ok(ids)
    }

    /// Sets `name` (`accession_id` or `specimen_id`; other names are ignored) to `value`,
    /// which must be valid and agree with any value already given.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        let slot = match name {
            ACCESSION_FIELD => &mut self.accession_id,
            SPECIMEN_FIELD => &mut self.specimen_id,
            _ => return Ok(()),
        };
        check(name, value)?;
        match slot {
            Some(old) if old != value => Err(ApiError::InvalidIdentifier(format!(
                "{name} was given twice with different values ({old:?} and {value:?}): \
                 send it once, as a header or as a multipart field"
            ))),
            Some(_) => Ok(()),
            None => {
                *slot = Some(value.to_string());
                Ok(())
            }
        }
    }

    /// True for the multipart field names that carry identifiers.
    pub fn is_field(name: &str) -> bool {
        matches!(name, ACCESSION_FIELD | SPECIMEN_FIELD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn validity() {
        for ok in ["A-1", "a", "ACC:2024/00017.b_c", &"x".repeat(64)] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "A 1",
            "A\n1",
            "é",
            "A;1",
            "<script>",
            "A\"1",
            "a\\b",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn headers_and_fields_merge_when_they_agree() {
        let mut h = HeaderMap::new();
        h.insert("X-Accession-Id", HeaderValue::from_static("A-1"));
        let mut ids = Identifiers::from_headers(&h).unwrap();
        assert_eq!(ids.accession_id.as_deref(), Some("A-1"));
        assert_eq!(ids.specimen_id, None);
        ids.set("accession_id", "A-1").unwrap();
        ids.set("specimen_id", "S-9").unwrap();
        ids.set("note", "anything at all").unwrap();
        assert_eq!(ids.specimen_id.as_deref(), Some("S-9"));
        let err = ids.set("accession_id", "A-2").unwrap_err();
        assert_eq!(err.code(), "invalid_identifier");
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("different values"));
        let err = ids.set("specimen_id", "S 9").unwrap_err();
        assert_eq!(err.code(), "invalid_identifier");
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("x-specimen-id", HeaderValue::from_static("has space"));
        assert_eq!(
            Identifiers::from_headers(&h).unwrap_err().code(),
            "invalid_identifier"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-specimen-id",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(
            Identifiers::from_headers(&h).unwrap_err().code(),
            "invalid_identifier"
        );
        let mut h = HeaderMap::new();
        h.append("x-accession-id", HeaderValue::from_static("A-1"));
        h.append("x-accession-id", HeaderValue::from_static("A-2"));
        assert!(Identifiers::from_headers(&h).is_err());
        assert_eq!(
            Identifiers::from_headers(&HeaderMap::new()).unwrap(),
            Identifiers::default()
        );
    }
}
