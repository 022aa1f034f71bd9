//! Managed-Secret annotation parsing (`meshca.io/*` annotations on a Secret).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use meshca::kube::managed::{parse_annotations, ANN_CA};

fuzz_target!(|pairs: Vec<(String, String)>| {
    let mut ann: BTreeMap<String, String> = pairs.into_iter().collect();
    let managed = ann.contains_key(ANN_CA);
    match parse_annotations(&ann) {
        None => assert!(!managed),
        Some(Ok(req)) => {
            assert!(managed);
            assert!(!req.sans.is_empty());
        }
        Some(Err(e)) => {
            let msg = e.to_string();
            assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
        }
    }
    // The same annotations with the CA key present.
    ann.entry(ANN_CA.to_string())
        .or_insert_with(|| "mesh".into());
    let _ = parse_annotations(&ann);
});
