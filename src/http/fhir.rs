//! FHIR R4 output of `POST /v1/classify`: when the `Accept` header prefers
//! `application/fhir+json`, the answer is a `Bundle` of type `collection` built here from the
//! JSON form of the same classify response and the model card. Pure functions; errors stay
//! the normal JSON error shape (no OperationOutcome: one error shape for every client).
//!
//! Contents, with `urn:uuid:` full URLs:
//! - one `Device` for the model: `deviceName` (model-name), `version`, `type.text` "AI model",
//!   the ONNX file's sha256 as an identifier and a property, the execution provider;
//! - per image, one `Media` (identifier: the image's sha256; content type, file name,
//!   width, height; never the pixels) and one `Observation`:
//!   - `status` `preliminary`, `category` laboratory, `meta.security` `AIAST` (AI asserted);
//!   - `code`: LOINC 5909-7 "Blood smear finding [Identifier] in Blood by Light microscopy"
//!     (the observable: a nominal finding on a light-microscopy blood smear) plus the local
//!     code [`CS_OBSERVATION`]`#leukemia-screen`, and text;
//!   - `valueCodeableConcept`: the label in the local system [`CS_FINDING`]
//!     (`leukemic` / `healthy` / `indeterminate`). Deliberately no SNOMED CT disorder code:
//!     a research model's output must not read as a coded diagnosis;
//!   - `interpretation`: v3 ObservationInterpretation POS / NEG / IND;
//!   - `component`s with UCUM `1` quantities: probability of leukemia, decision threshold,
//!     and when present the indeterminate band, `in_distribution` (boolean) and `ood_score` /
//!     `ood_threshold`;
//!   - `method` (text and a local code), `device` (the Device entry), `derivedFrom` (the
//!     Media entry, also by its sha256 identifier), `issued`, `note` (the disclaimer);
//!   - `basedOn`: a logical reference to the `ServiceRequest` by its accession number
//!     (identifier type v2-0203 `ACSN`), and `specimen`: a logical reference to the
//!     `Specimen` by its identifier, when the request carried them; `identifier`:
//!     `request_id/n`.

use crate::model_card::ModelCard;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";
/// The content type of FHIR answers (R4 is FHIR version 4.0).
pub const CONTENT_TYPE: &str = "application/fhir+json; fhirVersion=4.0";

/// Local code system of the findings (`leukemic`, `healthy`, `indeterminate`).
pub const CS_FINDING: &str = "urn:leuknet:codesystem:finding";
/// Local code system of the observation and component codes.
pub const CS_OBSERVATION: &str = "urn:leuknet:codesystem:observation";
/// Local code system of the method.
pub const CS_METHOD: &str = "urn:leuknet:codesystem:method";
/// Identifier system of the model file's sha256.
pub const ID_MODEL_SHA256: &str = "urn:leuknet:identifier:model-sha256";
/// Identifier system of an image's sha256.
pub const ID_IMAGE_SHA256: &str = "urn:leuknet:identifier:image-sha256";
/// Identifier system of accession numbers as sent by the client.
pub const ID_ACCESSION: &str = "urn:leuknet:identifier:accession-id";
/// Identifier system of specimen identifiers as sent by the client.
pub const ID_SPECIMEN: &str = "urn:leuknet:identifier:specimen-id";
/// Identifier system of request ids (`x-request-id`).
pub const ID_REQUEST: &str = "urn:leuknet:identifier:request-id";

const UCUM: &str = "http://unitsofmeasure.org";
const V3_OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
const V3_INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const MEDIA_TYPE: &str = "http://terminology.hl7.org/CodeSystem/media-type";
const LOINC: &str = "http://loinc.org";

/// The method, in words.
pub const METHOD_TEXT: &str = "LeukNet: Grad-CAM-capable convolutional neural network \
    (VGG-16 convolutional features, 1024-256-1 head) on the whole blood-smear image. \
    Research use only; not a medical device.";

/// True when the `Accept` header prefers `application/fhir+json` to `application/json`
/// (q-values, `type/*` and `*/*` honoured; the most specific range decides each type's q).
/// JSON stays the default: absent header, ties and headers that accept neither give false.
pub fn prefers_fhir(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let fhir = quality(accept, "application", "fhir+json").max(quality(
        accept,
        "application",
        "json+fhir",
    ));
    let json = quality(accept, "application", "json");
    fhir > json
}

/// The q-value `accept` gives `type/subtype`: that of the most specific matching range
/// (exact, then `type/*`, then `*/*`), 0 when none matches.
fn quality(accept: &str, ty: &str, subtype: &str) -> f32 {
    let mut best: Option<(u8, f32)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let Some((t, s)) = media.split_once('/') else {
            continue;
        };
        let (t, s) = (t.trim(), s.trim());
        let specificity = match (t, s) {
            _ if t == ty && s == subtype => 3,
            (_, "*") if t == ty => 2,
            ("*", "*") => 1,
            _ => continue,
        };
        let mut q = 1.0f32;
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .unwrap_or(0.0);
                }
            }
        }
        if best.is_none_or(|(b, _)| specificity > b) {
            best = Some((specificity, q));
        }
    }
    best.map_or(0.0, |(_, q)| q)
}

/// A `urn:uuid:` made from the seed, a kind and an index (UUID v4 layout), so one seed
/// gives the same bundle and every entry of a bundle its own id.
fn urn_uuid(seed: &uuid::Uuid, kind: &str, index: usize) -> String {
    let mut h = Sha256::new();
    h.update(seed.as_bytes());
    h.update(kind.as_bytes());
    h.update((index as u64).to_le_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    format!(
        "urn:uuid:{}",
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    )
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

/// A dimensionless UCUM quantity, or None when `v` is not a number.
fn ratio(v: Option<&Value>) -> Option<Value> {
    let x = v?.as_f64()?;
    Some(json!({"value": x, "unit": "1", "system": UCUM, "code": "1"}))
}

fn local_code(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

fn aiast() -> Value {
    json!({"system": V3_OBSERVATION_VALUE, "code": "AIAST", "display": "Artificial Intelligence asserted"})
}

fn content_type_of(format: &str) -> Option<&'static str> {
    Some(match format {
        "png" => "image/png",
        "jpeg" => "image/jpeg",
        "tiff" => "image/tiff",
        "bmp" => "image/bmp",
        _ => return None,
    })
}

/// The low and high ends of an indeterminate band given as `[low, high]` or
/// `{"low": .., "high": ..}`; None for an empty band (`low == high`: no band).
fn band(v: Option<&Value>) -> Option<(Value, Value)> {
    let v = v?;
    let (lo, hi) = match v {
        Value::Array(a) if a.len() == 2 => (&a[0], &a[1]),
        Value::Object(o) => (o.get("low")?, o.get("high")?),
        _ => return None,
    };
    if lo.as_f64()? >= hi.as_f64()? {
        return None;
    }
    Some((ratio(Some(lo))?, ratio(Some(hi))?))
}

fn device(card: &ModelCard, provider: Option<&str>) -> Value {
    let mut properties = vec![json!({
        "type": {"text": "sha256 of the ONNX model file"},
        "valueCode": [{"text": card.sha256}],
    })];
    if let Some(p) = provider {
        properties.push(json!({
            "type": {"text": "execution provider"},
            "valueCode": [{"text": p}],
        }));
    }
    let mut notes = vec![json!({"text": card.disclaimer})];
    if card.fixture {
        notes.push(json!({"text": "RANDOM-WEIGHT TEST FIXTURE: its answers mean nothing."}));
    }
    json!({
        "resourceType": "Device",
        "identifier": [{"system": ID_MODEL_SHA256, "value": card.sha256}],
        "status": "active",
        "deviceName": [{"name": card.name, "type": "model-name"}],
        "type": {"text": "AI model"},
        "version": [{"value": card.version}],
        "property": properties,
        "note": notes,
    })
}

fn media(image: &Value) -> Value {
    let mut m = Map::new();
    m.insert("resourceType".into(), json!("Media"));
    if let Some(sha) = str_of(image, "sha256") {
        m.insert(
            "identifier".into(),
            json!([{"system": ID_IMAGE_SHA256, "value": sha}]),
        );
    }
    m.insert("status".into(), json!("completed"));
    m.insert(
        "type".into(),
        json!({"coding": [{"system": MEDIA_TYPE, "code": "image", "display": "Image"}]}),
    );
    let mut content = Map::new();
    if let Some(ct) = str_of(image, "format").and_then(content_type_of) {
        content.insert("contentType".into(), json!(ct));
    }
    if let Some(name) = str_of(image, "filename") {
        content.insert("title".into(), json!(name));
    }
    m.insert("content".into(), Value::Object(content));
    for key in ["width", "height"] {
        if let Some(n) = image.get(key).and_then(Value::as_u64).filter(|&n| n > 0) {
            m.insert(key.into(), json!(n));
        }
    }
    Value::Object(m)
}

struct Finding {
    code: String,
    display: &'static str,
    interpretation: Option<(&'static str, &'static str)>,
}

fn finding(label: &str, card: &ModelCard) -> Finding {
    let (display, interpretation) = if label == card.classes.positive {
        (
            "Leukemic (AI screen: probability at or above the decision threshold)",
            Some(("POS", "Positive")),
        )
    } else if label == card.classes.negative {
        (
            "Healthy (AI screen: probability below the decision threshold)",
            Some(("NEG", "Negative")),
        )
    } else if label == "indeterminate" {
        (
            "Indeterminate (AI screen: no reliable answer for this image)",
            Some(("IND", "Indeterminate")),
        )
    } else {
        ("AI screen result", None)
    };
    Finding {
        // A FHIR code has no leading, trailing or double whitespace.
        code: label.split_whitespace().collect::<Vec<_>>().join(" "),
        display,
        interpretation,
    }
}

#[allow(clippy::too_many_arguments)]
fn observation(
    result: &Value,
    index: usize,
    request_id: Option<&str>,
    accession: Option<&str>,
    specimen: Option<&str>,
    card: &ModelCard,
    device_url: &str,
    media_url: &str,
    issued: &str,
) -> Value {
    let mut o = Map::new();
    o.insert("resourceType".into(), json!("Observation"));
    o.insert("meta".into(), json!({"security": [aiast()]}));
    if let Some(id) = request_id {
        o.insert(
            "identifier".into(),
            json!([{"system": ID_REQUEST, "value": format!("{id}/{}", index + 1)}]),
        );
    }
    if let Some(acc) = accession {
        o.insert(
            "basedOn".into(),
            json!([{
                "type": "ServiceRequest",
                "identifier": {
                    "type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]},
                    "system": ID_ACCESSION,
                    "value": acc,
                },
            }]),
        );
    }
    o.insert("status".into(), json!("preliminary"));
    o.insert(
        "category".into(),
        json!([{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}]),
    );
    o.insert(
        "code".into(),
        json!({
            "coding": [
                {"system": LOINC, "code": "5909-7", "display": "Blood smear finding [Identifier] in Blood by Light microscopy"},
                {"system": CS_OBSERVATION, "code": "leukemia-screen", "display": "AI leukemia screening of a blood-smear image"},
            ],
            "text": "AI leukemia screening of a blood-smear image (research use only)",
        }),
    );
    o.insert("issued".into(), json!(issued));

    let label = str_of(result, "label").unwrap_or("unknown");
    let f = finding(label, card);
    if !f.code.is_empty() {
        o.insert(
            "valueCodeableConcept".into(),
            json!({"coding": [{"system": CS_FINDING, "code": f.code, "display": f.display}], "text": label}),
        );
    }
    if let Some((code, display)) = f.interpretation {
        o.insert(
            "interpretation".into(),
            json!([{"coding": [{"system": V3_INTERPRETATION, "code": code, "display": display}]}]),
        );
    }
    let disclaimer = str_of(result, "disclaimer").unwrap_or(&card.disclaimer);
    o.insert("note".into(), json!([{"text": disclaimer}]));
    o.insert(
        "method".into(),
        json!({
            "coding": [{"system": CS_METHOD, "code": "leuknet-cnn", "display": "LeukNet CNN (research use)"}],
            "text": METHOD_TEXT,
        }),
    );
    if let Some(spec) = specimen {
        o.insert(
            "specimen".into(),
            json!({"type": "Specimen", "identifier": {"system": ID_SPECIMEN, "value": spec}}),
        );
    }
    o.insert(
        "device".into(),
        json!({"reference": device_url, "display": format!("{} {}", card.name, card.version)}),
    );
    let image = result.get("image").unwrap_or(&Value::Null);
    let mut derived = Map::new();
    derived.insert("reference".into(), json!(media_url));
    derived.insert("type".into(), json!("Media"));
    if let Some(sha) = str_of(image, "sha256") {
        derived.insert(
            "identifier".into(),
            json!({"system": ID_IMAGE_SHA256, "value": sha}),
        );
    }
    if let Some(name) = str_of(image, "filename") {
        derived.insert("display".into(), json!(name));
    }
    o.insert("derivedFrom".into(), json!([Value::Object(derived)]));

    let mut components = Vec::new();
    let mut quantity = |code: &str, display: &str, v: Option<&Value>| {
        if let Some(q) = ratio(v) {
            components.push(json!({
                "code": local_code(CS_OBSERVATION, code, display),
                "valueQuantity": q,
            }));
        }
    };
    quantity(
        "probability-leukemic",
        "Model probability of leukemia",
        result.get("probability"),
    );
    quantity(
        "decision-threshold",
        "Decision threshold on the probability of leukemia",
        result.get("threshold"),
    );
    quantity(
        "ood-score",
        "Out-of-distribution score",
        result.get("ood_score"),
    );
    quantity(
        "ood-threshold",
        "Out-of-distribution score threshold",
        result.get("ood_threshold"),
    );
    if let Some((low, high)) = band(result.get("indeterminate_band")) {
        components.push(json!({
            "code": local_code(CS_OBSERVATION, "indeterminate-band", "Probabilities labelled indeterminate"),
            "valueRange": {"low": low, "high": high},
        }));
    }
    if let Some(b) = result.get("in_distribution").and_then(Value::as_bool) {
        components.push(json!({
            "code": local_code(CS_OBSERVATION, "in-distribution", "Image resembles the training data"),
            "valueBoolean": b,
        }));
    }
    if !components.is_empty() {
        o.insert("component".into(), Value::Array(components));
    }
    Value::Object(o)
}

/// The FHIR R4 `Bundle` (type `collection`) for a classify response in its JSON form:
/// one `Device`, then a `Media` and an `Observation` per result, in request order.
/// `seed` makes the bundle id and every `urn:uuid:` (pass a fresh UUID per response).
pub fn bundle(response: &Value, card: &ModelCard, issued: SystemTime, seed: uuid::Uuid) -> Value {
    let issued = crate::audit::rfc3339_utc(issued);
    let request_id = str_of(response, "request_id");
    let results = response
        .get("results")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let provider = results
        .first()
        .and_then(|r| str_of(r, "execution_provider"));
    let device_url = urn_uuid(&seed, "device", 0);
    let mut entries = vec![json!({"fullUrl": device_url, "resource": device(card, provider)})];
    for (i, r) in results.iter().enumerate() {
        let media_url = urn_uuid(&seed, "media", i);
        let obs_url = urn_uuid(&seed, "observation", i);
        let accession = str_of(r, "accession_id").or_else(|| str_of(response, "accession_id"));
        let specimen = str_of(r, "specimen_id").or_else(|| str_of(response, "specimen_id"));
        let image = r.get("image").unwrap_or(&Value::Null);
        entries.push(json!({"fullUrl": media_url, "resource": media(image)}));
        entries.push(json!({
            "fullUrl": obs_url,
            "resource": observation(r, i, request_id, accession, specimen, card, &device_url, &media_url, &issued),
        }));
    }
    let mut b = Map::new();
    b.insert("resourceType".into(), json!("Bundle"));
    b.insert("id".into(), json!(seed.to_string()));
    if let Some(id) = request_id {
        b.insert(
            "identifier".into(),
            json!({"system": ID_REQUEST, "value": id}),
        );
    }
    b.insert("type".into(), json!("collection"));
    b.insert("timestamp".into(), json!(issued));
    b.insert("entry".into(), Value::Array(entries));
    Value::Object(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn card() -> ModelCard {
        serde_json::from_value(json!({
            "name": "leuknet", "version": "0.2.0", "description": "d", "onnx_file": "leuknet.onnx",
            "sha256": "ab".repeat(32),
            "input": {"tensor": {"name": "image", "shape": [-1, 3, 224, 224]}, "size": 224,
                      "channel_order": "RGB", "layout": "NCHW", "value_range": [0.0, 1.0],
                      "resize": "r", "normalization": "none"},
            "outputs": [{"name": "probability", "shape": [-1, 1]}],
            "probability_output": "probability",
            "classes": {"positive": "leukemic", "negative": "healthy"},
            "decision": {"threshold": 0.5, "chosen_by": "c"},
            "architecture": {}, "training": {}, "metrics": {},
            "intended_use": "research", "disclaimer": "Research use only; not a medical device."
        }))
        .unwrap()
    }

    fn response() -> Value {
        let result = |label: &str, p: f64, sha: &str| {
            json!({
                "accession_id": "A-1", "specimen_id": "S.1/2",
                "label": label, "probability": p, "threshold": 0.5,
                "model": {"name": "leuknet", "version": "0.2.0", "sha256": "ab".repeat(32)},
                "execution_provider": "cpu",
                "timings": {"decode_ms": 1.0, "queue_ms": 0.0, "inference_ms": 9.0},
                "image": {"width": 103, "height": 100, "format": "jpeg", "sha256": sha, "filename": "a.jpg"},
                "disclaimer": "Research use only; not a medical device."
            })
        };
        let mut third = result("indeterminate", 0.49, "ee");
        third["in_distribution"] = json!(false);
        third["ood_score"] = json!(3.5);
        third["ood_threshold"] = json!(2.0);
        third["indeterminate_band"] = json!({"low": 0.4, "high": 0.6});
        json!({
            "request_id": "req-9", "accession_id": "A-1", "specimen_id": "S.1/2",
            "results": [result("leukemic", 0.75, "cc"), result("healthy", 0.125, "dd"), third]
        })
    }

    fn build() -> Value {
        bundle(
            &response(),
            &card(),
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            uuid::Uuid::from_u128(42),
        )
    }

    fn coded<'a>(concept: &'a Value, system: &str) -> Option<&'a str> {
        concept["coding"]
            .as_array()?
            .iter()
            .find(|c| c["system"] == system)?["code"]
            .as_str()
    }

    fn component<'a>(obs: &'a Value, code: &str) -> Option<&'a Value> {
        obs["component"]
            .as_array()?
            .iter()
            .find(|c| coded(&c["code"], CS_OBSERVATION) == Some(code))
    }

    #[test]
    fn accept_negotiation_honours_q_values_and_wildcards() {
        let yes = [
            "application/fhir+json",
            "application/fhir+json; fhirVersion=4.0",
            "Application/FHIR+JSON",
            "application/json;q=0.5, application/fhir+json",
            "application/fhir+json, */*;q=0.1",
            "application/fhir+json;q=0.9, application/*;q=0.8",
            "application/json+fhir",
            "text/html, application/fhir+json;q=0.2",
        ];
        let no = [
            "",
            "*/*",
            "application/json",
            "application/*",
            "application/fhir+json, application/json",
            "application/fhir+json;q=0.5, application/json",
            "application/fhir+json;q=0, */*",
            "application/fhir+json;q=0.1, */*",
            "text/html",
            "application/fhir+json;q=nonsense, application/json;q=0.1",
            "garbage",
        ];
        for a in yes {
            assert!(prefers_fhir(Some(a)), "{a:?} should prefer FHIR");
        }
        for a in no {
            assert!(!prefers_fhir(Some(a)), "{a:?} should stay JSON");
        }
        assert!(!prefers_fhir(None));
    }

    #[test]
    fn bundle_has_a_device_and_a_media_and_observation_per_image() {
        let b = build();
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "collection");
        assert_eq!(b["timestamp"], "2023-11-14T22:13:20.250Z");
        assert_eq!(b["identifier"]["value"], "req-9");
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 1 + 2 * 3);
        let mut urls: Vec<&str> = entries
            .iter()
            .map(|e| e["fullUrl"].as_str().unwrap())
            .collect();
        for u in &urls {
            let id = u.strip_prefix("urn:uuid:").unwrap();
            assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        }
        urls.sort();
        urls.dedup();
        assert_eq!(urls.len(), entries.len(), "fullUrls are unique");
        // Same seed, same bundle; another seed, other ids.
        assert_eq!(build(), b);
        let other = bundle(&response(), &card(), UNIX_EPOCH, uuid::Uuid::from_u128(43));
        assert_ne!(other["entry"][0]["fullUrl"], b["entry"][0]["fullUrl"]);

        let dev = &entries[0]["resource"];
        assert_eq!(dev["resourceType"], "Device");
        assert_eq!(dev["deviceName"][0]["name"], "leuknet");
        assert_eq!(dev["deviceName"][0]["type"], "model-name");
        assert_eq!(dev["version"][0]["value"], "0.2.0");
        assert_eq!(dev["type"]["text"], "AI model");
        assert_eq!(dev["identifier"][0]["system"], ID_MODEL_SHA256);
        assert_eq!(dev["identifier"][0]["value"], "ab".repeat(32));

        let media = &entries[1]["resource"];
        assert_eq!(media["resourceType"], "Media");
        assert_eq!(media["identifier"][0]["value"], "cc");
        assert_eq!(media["content"]["contentType"], "image/jpeg");
        assert_eq!(media["content"]["title"], "a.jpg");
        assert_eq!(media["width"], 103);
        assert!(media["content"].get("data").is_none());
    }

    #[test]
    fn observations_carry_finding_probability_ids_and_labels() {
        let b = build();
        let entries = b["entry"].as_array().unwrap();
        let device_url = entries[0]["fullUrl"].as_str().unwrap();
        let expected = [
            ("leukemic", "POS", 0.75, "cc"),
            ("healthy", "NEG", 0.125, "dd"),
            ("indeterminate", "IND", 0.49, "ee"),
        ];
        for (i, (label, interp, p, sha)) in expected.into_iter().enumerate() {
            let media_url = entries[1 + 2 * i]["fullUrl"].as_str().unwrap();
            let o = &entries[2 + 2 * i]["resource"];
            assert_eq!(o["resourceType"], "Observation");
            assert_eq!(o["status"], "preliminary");
            assert_eq!(o["meta"]["security"][0]["code"], "AIAST");
            assert_eq!(o["meta"]["security"][0]["system"], V3_OBSERVATION_VALUE);
            assert_eq!(coded(&o["code"], LOINC), Some("5909-7"));
            assert_eq!(coded(&o["code"], CS_OBSERVATION), Some("leukemia-screen"));
            assert_eq!(coded(&o["valueCodeableConcept"], CS_FINDING), Some(label));
            assert_eq!(
                coded(&o["interpretation"][0], V3_INTERPRETATION),
                Some(interp)
            );
            let prob = component(o, "probability-leukemic").unwrap();
            assert_eq!(prob["valueQuantity"]["value"], p);
            assert_eq!(prob["valueQuantity"]["unit"], "1");
            assert_eq!(prob["valueQuantity"]["system"], UCUM);
            assert_eq!(prob["valueQuantity"]["code"], "1");
            assert_eq!(
                component(o, "decision-threshold").unwrap()["valueQuantity"]["value"],
                0.5
            );
            assert_eq!(o["device"]["reference"], device_url);
            assert_eq!(o["derivedFrom"][0]["reference"], media_url);
            assert_eq!(o["derivedFrom"][0]["identifier"]["value"], sha);
            assert_eq!(o["basedOn"][0]["type"], "ServiceRequest");
            assert_eq!(o["basedOn"][0]["identifier"]["value"], "A-1");
            assert_eq!(
                o["basedOn"][0]["identifier"]["type"]["coding"][0]["code"],
                "ACSN"
            );
            assert_eq!(o["specimen"]["identifier"]["value"], "S.1/2");
            assert_eq!(o["identifier"][0]["value"], format!("req-9/{}", i + 1));
            assert_eq!(o["issued"], "2023-11-14T22:13:20.250Z");
            assert!(o["note"][0]["text"]
                .as_str()
                .unwrap()
                .contains("Research use only"));
            assert!(o["method"]["text"].as_str().unwrap().contains("Grad-CAM"));
        }
        // OOD and the band only where the result has them.
        let first = &entries[2]["resource"];
        assert!(component(first, "in-distribution").is_none());
        assert!(component(first, "ood-score").is_none());
        let third = &entries[6]["resource"];
        assert_eq!(
            component(third, "in-distribution").unwrap()["valueBoolean"],
            false
        );
        assert_eq!(
            component(third, "ood-score").unwrap()["valueQuantity"]["value"],
            3.5
        );
        assert_eq!(
            component(third, "ood-threshold").unwrap()["valueQuantity"]["value"],
            2.0
        );
        let band = component(third, "indeterminate-band").unwrap();
        assert_eq!(band["valueRange"]["low"]["value"], 0.4);
        assert_eq!(band["valueRange"]["high"]["value"], 0.6);
    }

    #[test]
    fn ids_are_left_out_when_absent() {
        let mut resp = response();
        for r in resp["results"].as_array_mut().unwrap() {
            let r = r.as_object_mut().unwrap();
            r.remove("accession_id");
            r.remove("specimen_id");
            r["image"].as_object_mut().unwrap().remove("filename");
        }
        let resp = {
            let mut o = resp.as_object().unwrap().clone();
            o.remove("accession_id");
            o.remove("specimen_id");
            Value::Object(o)
        };
        let b = bundle(&resp, &card(), UNIX_EPOCH, uuid::Uuid::from_u128(1));
        let o = &b["entry"][2]["resource"];
        // An empty band (no band) and null OOD figures give no components.
        let mut resp2 = resp.clone();
        resp2["results"][2]["indeterminate_band"] = json!({"low": 0.5, "high": 0.5});
        resp2["results"][2]["ood_score"] = Value::Null;
        resp2["results"][2]["in_distribution"] = Value::Null;
        let b2 = bundle(&resp2, &card(), UNIX_EPOCH, uuid::Uuid::from_u128(1));
        let third = &b2["entry"][6]["resource"];
        assert!(component(third, "indeterminate-band").is_none());
        assert!(component(third, "ood-score").is_none());
        assert!(component(third, "in-distribution").is_none());
        assert!(o.get("basedOn").is_none());
        assert!(o.get("specimen").is_none());
        assert!(o["derivedFrom"][0].get("display").is_none());
        assert!(b["entry"][1]["resource"]["content"].get("title").is_none());
        // A fixture model says so on its Device.
        let mut c = card();
        c.fixture = true;
        let b = bundle(&resp, &c, UNIX_EPOCH, uuid::Uuid::from_u128(1));
        assert!(b["entry"][0]["resource"]["note"]
            .to_string()
            .contains("FIXTURE"));
    }
}
