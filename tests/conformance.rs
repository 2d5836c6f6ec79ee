//! The HAID codec against the vectors produced by the real Linkis codec
//! (tests/data/CONFORMANCE.md), and encode/decode round trips.

use std::path::Path;

use hagate::{context_id, haid};
use proptest::prelude::*;
use serde_json::Value;

fn lines(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn every_linkis_haid_vector_agrees() {
    let vectors = lines("linkis-haid-vectors.jsonl");
    assert_eq!(vectors.len(), 4000);
    let mut failures = Vec::new();
    let (mut valid, mut invalid) = (0, 0);
    for v in &vectors {
        let input = v["haid"].as_str().unwrap();
        let got = haid::decode(input);
        let ok = if v["valid"] == true {
            valid += 1;
            matches!(got, Ok(h) if h.main == v["main"] && h.backup == v["backup"] && h.id == v["id"])
        } else {
            invalid += 1;
            got.is_err()
        };
        if !ok {
            failures.push(format!("{input:?}: linkis {v}, hagate {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!((valid, invalid), (2070, 1930));
}

#[test]
fn every_wrapped_context_id_decodes_to_its_parts() {
    let vectors = lines("linkis-contextid-json.jsonl");
    assert_eq!(vectors.len(), 300);
    for v in &vectors {
        let raw = v["contextID"].as_str().unwrap();
        // as a header
        let found = context_id::find(None, "contextID", Some(raw.as_bytes()))
            .unwrap()
            .unwrap();
        let text = context_id::unwrap(&found).unwrap();
        assert_eq!(text, v["haid"].as_str().unwrap());
        let h = haid::decode(&text).unwrap();
        assert_eq!(
            (h.main, h.backup, h.id),
            (
                v["main"].as_str().unwrap(),
                v["backup"].as_str().unwrap(),
                v["id"].as_str().unwrap()
            )
        );
        // and as a percent-encoded query parameter
        let query = format!(
            "x=1&contextID={}",
            percent_encoding::utf8_percent_encode(raw, percent_encoding::NON_ALPHANUMERIC)
        );
        let found = context_id::find(Some(&query), "contextID", None)
            .unwrap()
            .unwrap();
        assert_eq!(
            context_id::unwrap(&found).unwrap(),
            v["haid"].as_str().unwrap()
        );
    }
}

fn alias() -> impl Strategy<Value = String> {
    // Linkis-style route-label aliases, Base64 host:port aliases, and non-ASCII ones.
    prop_oneof![
        "cs_[1-9]_[a-z]{0,8}",
        "[A-Za-z0-9+/]{4,40}={0,2}",
        "[a-zé中😀:._]{1,12}",
    ]
}

proptest! {
    #[test]
    fn encode_then_decode_round_trips(
        main in alias(),
        backups in prop::collection::vec(alias(), 1..4),
        id in "[0-9]{1,19}",
    ) {
        let refs: Vec<&str> = backups.iter().map(String::as_str).collect();
        let encoded = haid::encode(&main, &refs, &id).unwrap();
        let h = haid::decode(&encoded).unwrap();
        prop_assert_eq!(h.main, main.as_str());
        prop_assert_eq!(h.backup, backups[0].as_str());
        prop_assert_eq!(h.id, id.as_str());
        if backups.len() == 1 {
            prop_assert_eq!(h.to_string(), encoded);
        }
    }

    #[test]
    fn decode_never_panics(s in "\\PC{0,64}") {
        let _ = haid::decode(&s);
    }
}
