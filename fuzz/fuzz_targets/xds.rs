//! xDS request handling in the I/O-free state machine (sds/src/xds.rs), state of the world
//! and delta: an arbitrary sequence of requests and catalog changes. Checks the rules the
//! module promises: every push carries the catalog's current version of a subscribed name
//! under a fresh nonce, and the unacknowledged-response map stays bounded.
#![no_main]

use std::collections::{BTreeMap, HashSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshca_sds::xds::{DeltaRequest, DeltaStream, Outcome, SotwRequest, SotwStream};

const NAMES: [&str; 5] = ["default", "ROOTCA", "bundle-a", "", "bundle-b"];

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Any(String),
}

impl Name {
    fn get(&self) -> String {
        match self {
            Name::Known(i) => NAMES[*i as usize % NAMES.len()].to_string(),
            Name::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Nonce {
    Empty,
    /// One of the nonces sent so far (counted back from the latest).
    Sent(u8),
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Sotw {
        version: Name,
        nonce: Nonce,
        names: Vec<Name>,
        nack: Option<String>,
    },
    Delta {
        nonce: Nonce,
        subscribe: Vec<Name>,
        unsubscribe: Vec<Name>,
        initial: Vec<(Name, Name)>,
        nack: Option<String>,
    },
    Set(Name, u8),
    Remove(Name),
}

#[derive(Arbitrary, Debug)]
struct Input {
    catalog: Vec<(Name, u8)>,
    ops: Vec<Op>,
}

fn check(
    out: &Outcome,
    catalog: &BTreeMap<String, String>,
    subscribed: &HashSet<String>,
    nonces: &mut Vec<String>,
) {
    for p in &out.pushes {
        assert_eq!(
            catalog.get(&p.name),
            Some(&p.version),
            "push of the current version"
        );
        assert!(
            subscribed.contains(&p.name),
            "push of a subscribed name: {}",
            p.name
        );
        assert!(!nonces.contains(&p.nonce), "fresh nonce");
        nonces.push(p.nonce.clone());
    }
    for r in &out.removals {
        assert!(!nonces.contains(&r.nonce), "fresh nonce");
        nonces.push(r.nonce.clone());
    }
}

fuzz_target!(|inp: Input| {
    let mut catalog: BTreeMap<String, String> = inp
        .catalog
        .iter()
        .map(|(n, v)| (n.get(), format!("v{v}")))
        .collect();
    let mut sotw = SotwStream::new("s");
    let mut delta = DeltaStream::new("d");
    let (mut sotw_nonces, mut delta_nonces) = (Vec::new(), Vec::new());
    let pick = |n: &Nonce, sent: &Vec<String>| match n {
        Nonce::Empty => String::new(),
        Nonce::Sent(i) => sent
            .iter()
            .rev()
            .nth(*i as usize % 4)
            .cloned()
            .unwrap_or_default(),
        Nonce::Any(s) => s.clone(),
    };
    for op in inp.ops.iter().take(64) {
        match op {
            Op::Sotw {
                version,
                nonce,
                names,
                nack,
            } => {
                let req = SotwRequest {
                    version_info: version.get(),
                    response_nonce: pick(nonce, &sotw_nonces),
                    resource_names: names.iter().map(Name::get).collect(),
                    error_detail: nack.clone(),
                };
                let out = sotw.on_request(&req, &catalog);
                let subs = sotw.subscribed().map(str::to_string).collect();
                check(&out, &catalog, &subs, &mut sotw_nonces);
                assert!(out.removals.is_empty(), "state of the world never removes");
            }
            Op::Delta {
                nonce,
                subscribe,
                unsubscribe,
                initial,
                nack,
            } => {
                let req = DeltaRequest {
                    response_nonce: pick(nonce, &delta_nonces),
                    subscribe: subscribe.iter().map(Name::get).collect(),
                    unsubscribe: unsubscribe.iter().map(Name::get).collect(),
                    initial_versions: initial.iter().map(|(n, v)| (n.get(), v.get())).collect(),
                    error_detail: nack.clone(),
                };
                let out = delta.on_request(&req, &catalog);
                let subs = delta.subscribed().map(str::to_string).collect();
                check(&out, &catalog, &subs, &mut delta_nonces);
            }
            Op::Set(n, v) => {
                catalog.insert(n.get(), format!("v{v}"));
                let out = sotw.on_update(&catalog);
                let subs = sotw.subscribed().map(str::to_string).collect();
                check(&out, &catalog, &subs, &mut sotw_nonces);
                let out = delta.on_update(&catalog);
                let subs = delta.subscribed().map(str::to_string).collect();
                check(&out, &catalog, &subs, &mut delta_nonces);
            }
            Op::Remove(n) => {
                catalog.remove(&n.get());
                let out = sotw.on_update(&catalog);
                let subs = sotw.subscribed().map(str::to_string).collect();
                check(&out, &catalog, &subs, &mut sotw_nonces);
                let out = delta.on_update(&catalog);
                let subs = delta.subscribed().map(str::to_string).collect();
                check(&out, &catalog, &subs, &mut delta_nonces);
            }
        }
        assert!(sotw.outstanding() <= 64 && delta.outstanding() <= 64);
    }
});
