//! xDS bookkeeping for one SDS stream, free of I/O.
//!
//! The service layer feeds every request and every catalog change into a [`SotwStream`] or a
//! [`DeltaStream`] and gets back what to send and what happened (for logs and metrics). The
//! rules implemented here:
//!
//! - Every response carries a fresh nonce and exactly one resource, so that a response for
//!   a subscription always holds exactly one Secret whose name matches (Envoy rejects
//!   anything else).
//! - A request carrying `error_detail` is a NACK of the response whose nonce it names; its
//!   `version_info` stays at the last good version. The rejected version is never re-sent:
//!   the next push for that name is the next real change.
//! - State of the world: requests whose nonce is stale (neither empty nor the latest nonce
//!   sent) are ignored for subscription changes; they still count as ACK/NACK of the
//!   response they name, so no NACK goes unnoticed.
//! - Incremental (delta): subscribe/unsubscribe lists are applied from every request;
//!   `initial_resource_versions` of a reconnecting client suppress resending what it has.
//! - A resource is never re-sent unchanged on the same stream (tracked as the last version
//!   sent per name; versions are content hashes).
//! - An unknown name is reported once per stream and served as soon as it appears.
//! - At most one response per name is unacknowledged: a newer version of a name whose last
//!   response the client has not ACKed or NACKed yet waits for that answer, and then only
//!   the newest version goes. So a client that stops reading (or answering) holds at most
//!   one response per subscribed name on the server, however often the secret changes,
//!   and a slow client skips versions it could not take in time. (go-control-plane's
//!   servers and Envoy's own management servers pace a stream the same way.) In state of the
//!   world, an ACK of the latest nonce answers every earlier response too.

use std::collections::{BTreeMap, BTreeSet};

/// Where the current resource versions come from (the published secret snapshot).
pub trait Versions {
    /// The version of `name`, or `None` if no such resource exists now.
    fn version_of(&self, name: &str) -> Option<&str>;
}

impl Versions for BTreeMap<String, String> {
    fn version_of(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// One response to send: a single named resource at a version, under a fresh nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// Resource name.
    pub name: String,
    /// Its version (the content hash).
    pub version: String,
    /// The nonce of this response.
    pub nonce: String,
}

/// A response removing resources (delta only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    /// Names the client must forget.
    pub names: Vec<String>,
    /// The nonce of this response.
    pub nonce: String,
}

/// What a request or update caused, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The client accepted `version` of `name`.
    Ack {
        /// Resource name.
        name: String,
        /// Accepted version.
        version: String,
    },
    /// The client rejected `version` of `name`.
    Nack {
        /// Resource name.
        name: String,
        /// Rejected version.
        version: String,
        /// The client's error message.
        detail: String,
    },
    /// A request named a nonce this stream never sent or that is no longer current.
    StaleNonce {
        /// The nonce the request carried.
        nonce: String,
    },
    /// A name was added to the stream's subscriptions.
    Subscribed(String),
    /// A name was removed from the stream's subscriptions.
    Unsubscribed(String),
    /// A subscribed name has no resource (reported once per stream until it appears).
    Unknown(String),
}

/// The result of feeding a request or an update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Responses to send, in order.
    pub pushes: Vec<Push>,
    /// Delta removals to send (always empty for state of the world).
    pub removals: Vec<Removal>,
    /// What happened.
    pub events: Vec<Event>,
}

/// A map for the handful of entries one stream holds (usually one name), in insertion order.
/// A stream at fleet scale is mostly this bookkeeping and HTTP/2 state, so it is kept tight:
/// one exact allocation instead of a hash table's four buckets and control bytes.
#[derive(Debug)]
struct SmallMap<V>(Vec<(String, V)>);

impl<V> Default for SmallMap<V> {
    fn default() -> Self {
        SmallMap(Vec::new())
    }
}

impl<V> SmallMap<V> {
    fn get(&self, k: &str) -> Option<&V> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }

    fn contains_key(&self, k: &str) -> bool {
        self.get(k).is_some()
    }

    fn insert(&mut self, k: String, v: V) {
        match self.0.iter_mut().find(|(n, _)| *n == k) {
            Some(e) => e.1 = v,
            None => {
                self.0.reserve_exact(1);
                self.0.push((k, v));
            }
        }
    }

    fn remove(&mut self, k: &str) -> Option<V> {
        let i = self.0.iter().position(|(n, _)| n == k)?;
        let v = self.0.remove(i).1;
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(v)
    }

    /// Removes the entry inserted first.
    fn remove_oldest(&mut self) {
        if !self.0.is_empty() {
            self.0.remove(0);
        }
    }

    fn retain(&mut self, mut f: impl FnMut(&str, &V) -> bool) {
        self.0.retain(|(k, v)| f(k, v));
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Vec::new();
    }
}

/// Per-name bookkeeping shared by both protocol variants.
#[derive(Debug, Default)]
struct Tracker {
    /// Nonce prefix (the stream id), so nonces are unique across streams in logs.
    prefix: String,
    counter: u64,
    /// Subscribed names.
    subscribed: BTreeSet<String>,
    /// Last version sent (or known to the client) per name; never re-sent.
    sent: SmallMap<String>,
    /// Last version the client accepted per name.
    acked: SmallMap<String>,
    /// Responses not yet acknowledged: nonce -> (name, version).
    outstanding: SmallMap<(String, String)>,
    /// Subscribed names reported as unknown and not seen since.
    reported_unknown: BTreeSet<String>,
    /// The latest nonce sent.
    latest: Option<String>,
    /// A change was held back because its name had a response in flight.
    deferred: bool,
}

/// Bound on unacknowledged responses remembered per stream: a client that never ACKs
/// cannot grow the map without limit.
const MAX_OUTSTANDING: usize = 64;

impl Tracker {
    fn new(prefix: &str) -> Self {
        Tracker {
            prefix: prefix.to_string(),
            ..Tracker::default()
        }
    }

    fn next_nonce(&mut self) -> String {
        self.counter += 1;
        let n = format!("{}-{}", self.prefix, self.counter);
        self.latest = Some(n.clone());
        n
    }

    fn push(&mut self, name: &str, version: &str, out: &mut Outcome) {
        let nonce = self.next_nonce();
        self.sent.insert(name.to_string(), version.to_string());
        if self.outstanding.len() >= MAX_OUTSTANDING {
            // Forget the oldest response (nonces are inserted in the order sent).
            self.outstanding.remove_oldest();
        }
        self.outstanding
            .insert(nonce.clone(), (name.to_string(), version.to_string()));
        self.reported_unknown.remove(name);
        out.pushes.push(Push {
            name: name.to_string(),
            version: version.to_string(),
            nonce,
        });
    }

    /// Resolves the ACK/NACK a request carries. Returns whether the nonce was known.
    fn resolve(&mut self, nonce: &str, error: Option<&str>, out: &mut Outcome) -> bool {
        let Some((name, version)) = self.outstanding.remove(nonce) else {
            return false;
        };
        match error {
            None => {
                self.acked.insert(name.clone(), version.clone());
                out.events.push(Event::Ack { name, version });
            }
            Some(detail) => out.events.push(Event::Nack {
                name,
                version,
                detail: detail.to_string(),
            }),
        }
        true
    }

    /// Whether a response for `name` awaits the client's ACK or NACK.
    fn in_flight(&self, name: &str) -> bool {
        self.outstanding.values().any(|(n, _)| n == name)
    }

    /// After an ACK or NACK: sends what was held back for names no longer in flight.
    fn resume(&mut self, catalog: &dyn Versions, out: &mut Outcome) {
        if self.deferred {
            self.deferred = false;
            let names: Vec<String> = self.subscribed.iter().cloned().collect();
            self.sync(catalog, &names, out);
        }
    }

    /// Sends every subscribed name whose current version differs from what was sent, except
    /// names with a response in flight (held back until the client answers it).
    fn sync(&mut self, catalog: &dyn Versions, names: &[String], out: &mut Outcome) {
        for name in names {
            match catalog.version_of(name) {
                Some(v) => {
                    if self.sent.get(name).map(String::as_str) != Some(v) {
                        if self.in_flight(name) {
                            self.deferred = true;
                            continue;
                        }
                        let v = v.to_string();
                        self.push(name, &v, out);
                    }
                }
                None => {
                    if self.reported_unknown.insert(name.clone()) {
                        out.events.push(Event::Unknown(name.clone()));
                    }
                }
            }
        }
    }

    fn forget(&mut self, name: &str) {
        self.sent.remove(name);
        self.acked.remove(name);
        self.reported_unknown.remove(name);
        self.outstanding.retain(|_, (n, _)| n != name);
    }
}

/// A state-of-the-world request, reduced to what the bookkeeping needs.
#[derive(Clone, Debug, Default)]
pub struct SotwRequest {
    /// `version_info`: the last version the client accepted.
    pub version_info: String,
    /// `response_nonce`: empty on the first request of a stream.
    pub response_nonce: String,
    /// `resource_names`: the complete set of names the client wants.
    pub resource_names: Vec<String>,
    /// `error_detail.message`, present on a NACK.
    pub error_detail: Option<String>,
}

/// Bookkeeping of one `StreamSecrets` stream.
#[derive(Debug)]
pub struct SotwStream {
    t: Tracker,
    requests: u64,
}

impl SotwStream {
    /// A new stream; `id` prefixes its nonces.
    pub fn new(id: &str) -> Self {
        SotwStream {
            t: Tracker::new(id),
            requests: 0,
        }
    }

    /// Feeds one request and returns the responses it calls for.
    pub fn on_request(&mut self, req: &SotwRequest, catalog: &dyn Versions) -> Outcome {
        let mut out = Outcome::default();
        self.requests += 1;
        let first = self.requests == 1;
        if !req.response_nonce.is_empty() {
            let known = self
                .t
                .resolve(&req.response_nonce, req.error_detail.as_deref(), &mut out);
            let latest = self.t.latest.as_deref() == Some(req.response_nonce.as_str());
            if !latest {
                if !known {
                    out.events.push(Event::StaleNonce {
                        nonce: req.response_nonce.clone(),
                    });
                }
                // Stale: the ACK/NACK is noted, but the subscription set is not applied.
                self.t.resume(catalog, &mut out);
                return out;
            }
            // The client has seen the latest response, so every earlier one too.
            self.t.outstanding.clear();
        }
        let wanted: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        for gone in self
            .t
            .subscribed
            .difference(&wanted)
            .cloned()
            .collect::<Vec<_>>()
        {
            self.t.forget(&gone);
            out.events.push(Event::Unsubscribed(gone));
        }
        let added: Vec<String> = wanted.difference(&self.t.subscribed).cloned().collect();
        for n in &added {
            out.events.push(Event::Subscribed(n.clone()));
        }
        self.t.subscribed = wanted;
        // A reconnecting client names the version it already holds; when that is the current
        // version of a name it asks for, that name needs no push.
        if first && req.response_nonce.is_empty() && !req.version_info.is_empty() {
            for n in &added {
                if catalog.version_of(n) == Some(req.version_info.as_str()) {
                    self.t.sent.insert(n.clone(), req.version_info.clone());
                    self.t.acked.insert(n.clone(), req.version_info.clone());
                }
            }
        }
        let names: Vec<String> = self.t.subscribed.iter().cloned().collect();
        self.t.sync(catalog, &names, &mut out);
        out
    }

    /// Feeds a catalog change and returns the pushes it calls for.
    pub fn on_update(&mut self, catalog: &dyn Versions) -> Outcome {
        let mut out = Outcome::default();
        let names: Vec<String> = self.t.subscribed.iter().cloned().collect();
        self.t.sync(catalog, &names, &mut out);
        out
    }

    /// The names this stream subscribes to.
    pub fn subscribed(&self) -> impl Iterator<Item = &str> {
        self.t.subscribed.iter().map(String::as_str)
    }

    /// The version the client last accepted for `name`.
    pub fn acked(&self, name: &str) -> Option<&str> {
        self.t.acked.get(name).map(String::as_str)
    }

    /// Number of responses sent and not yet acknowledged (bounded).
    pub fn outstanding(&self) -> usize {
        self.t.outstanding.len()
    }
}

/// An incremental request, reduced to what the bookkeeping needs.
#[derive(Clone, Debug, Default)]
pub struct DeltaRequest {
    /// `response_nonce`: empty unless acknowledging.
    pub response_nonce: String,
    /// `resource_names_subscribe`.
    pub subscribe: Vec<String>,
    /// `resource_names_unsubscribe`.
    pub unsubscribe: Vec<String>,
    /// `initial_resource_versions` (first request of a stream only).
    pub initial_versions: BTreeMap<String, String>,
    /// `error_detail.message`, present on a NACK.
    pub error_detail: Option<String>,
}

/// Bookkeeping of one `DeltaSecrets` stream.
#[derive(Debug)]
pub struct DeltaStream {
    t: Tracker,
    requests: u64,
}

impl DeltaStream {
    /// A new stream; `id` prefixes its nonces.
    pub fn new(id: &str) -> Self {
        DeltaStream {
            t: Tracker::new(id),
            requests: 0,
        }
    }

    /// Feeds one request and returns the responses it calls for.
    pub fn on_request(&mut self, req: &DeltaRequest, catalog: &dyn Versions) -> Outcome {
        let mut out = Outcome::default();
        self.requests += 1;
        if !req.response_nonce.is_empty()
            && !self
                .t
                .resolve(&req.response_nonce, req.error_detail.as_deref(), &mut out)
        {
            out.events.push(Event::StaleNonce {
                nonce: req.response_nonce.clone(),
            });
        }
        if self.requests == 1 {
            for (n, v) in &req.initial_versions {
                if !n.is_empty() && !v.is_empty() {
                    self.t.sent.insert(n.clone(), v.clone());
                    self.t.acked.insert(n.clone(), v.clone());
                }
            }
        }
        let mut added = Vec::new();
        for n in req.subscribe.iter().filter(|n| !n.is_empty()) {
            if self.t.subscribed.insert(n.clone()) {
                out.events.push(Event::Subscribed(n.clone()));
                added.push(n.clone());
            }
        }
        for n in req.unsubscribe.iter() {
            if self.t.subscribed.remove(n) {
                self.t.forget(n);
                out.events.push(Event::Unsubscribed(n.clone()));
            }
        }
        // Initial versions for names the client did not subscribe to mean nothing.
        let subscribed = &self.t.subscribed;
        self.t.sent.retain(|n, _| subscribed.contains(n));
        self.t.acked.retain(|n, _| subscribed.contains(n));
        // A client that already holds a resource we no longer have must be told it is gone.
        let mut gone = Vec::new();
        for n in &added {
            if catalog.version_of(n).is_none() && self.t.sent.remove(n).is_some() {
                gone.push(n.clone());
            }
        }
        if !gone.is_empty() {
            let nonce = self.t.next_nonce();
            out.removals.push(Removal { names: gone, nonce });
        }
        let added: Vec<String> = added
            .into_iter()
            .filter(|n| self.t.subscribed.contains(n))
            .collect();
        self.t.sync(catalog, &added, &mut out);
        self.t.resume(catalog, &mut out);
        out
    }

    /// Feeds a catalog change: pushes changed resources and removes vanished ones.
    pub fn on_update(&mut self, catalog: &dyn Versions) -> Outcome {
        let mut out = Outcome::default();
        let names: Vec<String> = self.t.subscribed.iter().cloned().collect();
        let mut gone = Vec::new();
        for n in &names {
            if catalog.version_of(n).is_none() && self.t.sent.contains_key(n) {
                self.t.sent.remove(n);
                self.t.acked.remove(n);
                // The removal supersedes a response still in flight.
                self.t.outstanding.retain(|_, (x, _)| x != n);
                gone.push(n.clone());
            }
        }
        if !gone.is_empty() {
            let nonce = self.t.next_nonce();
            out.removals.push(Removal { names: gone, nonce });
        }
        self.t.sync(catalog, &names, &mut out);
        out
    }

    /// The names this stream subscribes to.
    pub fn subscribed(&self) -> impl Iterator<Item = &str> {
        self.t.subscribed.iter().map(String::as_str)
    }

    /// The version the client last accepted for `name`.
    pub fn acked(&self, name: &str) -> Option<&str> {
        self.t.acked.get(name).map(String::as_str)
    }

    /// Number of responses sent and not yet acknowledged (bounded).
    pub fn outstanding(&self) -> usize {
        self.t.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn sotw(names: &[&str], nonce: &str, version: &str, err: Option<&str>) -> SotwRequest {
        SotwRequest {
            version_info: version.into(),
            response_nonce: nonce.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            error_detail: err.map(str::to_string),
        }
    }

    fn names(o: &Outcome) -> Vec<(&str, &str)> {
        o.pushes
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect()
    }

    #[test]
    fn sotw_first_request_pushes_each_known_name_in_its_own_response() {
        let c = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let mut s = SotwStream::new("s1");
        let o = s.on_request(&sotw(&["default", "ROOTCA"], "", "", None), &c);
        assert_eq!(names(&o), vec![("ROOTCA", "r1"), ("default", "v1")]);
        assert_ne!(
            o.pushes[0].nonce, o.pushes[1].nonce,
            "every response has a fresh nonce"
        );
        assert!(o.pushes.iter().all(|p| p.nonce.starts_with("s1-")));
        assert!(o.events.contains(&Event::Subscribed("default".into())));
        assert_eq!(s.outstanding(), 2);
    }

    #[test]
    fn sotw_ack_records_and_sends_nothing() {
        let c = cat(&[("default", "v1")]);
        let mut s = SotwStream::new("s");
        let o = s.on_request(&sotw(&["default"], "", "", None), &c);
        let n = o.pushes[0].nonce.clone();
        let o = s.on_request(&sotw(&["default"], &n, "v1", None), &c);
        assert!(o.pushes.is_empty());
        assert_eq!(
            o.events,
            vec![Event::Ack {
                name: "default".into(),
                version: "v1".into()
            }]
        );
        assert_eq!(s.acked("default"), Some("v1"));
        assert_eq!(s.outstanding(), 0);
        // The same request again (duplicate ACK) is stale now and changes nothing.
        let o = s.on_request(&sotw(&["default"], &n, "v1", None), &c);
        assert!(o.pushes.is_empty());
    }

    #[test]
    fn sotw_update_pushes_only_changed_names() {
        let mut s = SotwStream::new("s");
        let c1 = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let o = s.on_request(&sotw(&["default", "ROOTCA"], "", "", None), &c1);
        let last = o.pushes.last().unwrap().nonce.clone();
        s.on_request(&sotw(&["default", "ROOTCA"], &last, "", None), &c1);
        assert!(
            s.on_update(&c1).pushes.is_empty(),
            "unchanged: nothing resent"
        );
        let c2 = cat(&[("default", "v2"), ("ROOTCA", "r1")]);
        assert_eq!(names(&s.on_update(&c2)), vec![("default", "v2")]);
        assert!(s.on_update(&c2).pushes.is_empty());
        // A resource that is not subscribed never goes out.
        let c3 = cat(&[("default", "v2"), ("ROOTCA", "r1"), ("other", "o1")]);
        assert!(s.on_update(&c3).pushes.is_empty());
    }

    #[test]
    fn sotw_nack_is_recorded_and_not_repushed_until_next_change() {
        let mut s = SotwStream::new("s");
        let c1 = cat(&[("default", "v1")]);
        let n1 = s.on_request(&sotw(&["default"], "", "", None), &c1).pushes[0]
            .nonce
            .clone();
        s.on_request(&sotw(&["default"], &n1, "v1", None), &c1);
        let c2 = cat(&[("default", "v2")]);
        let n2 = s.on_update(&c2).pushes[0].nonce.clone();
        let o = s.on_request(&sotw(&["default"], &n2, "v1", Some("bad key")), &c2);
        assert_eq!(
            o.events,
            vec![Event::Nack {
                name: "default".into(),
                version: "v2".into(),
                detail: "bad key".into()
            }]
        );
        assert!(
            o.pushes.is_empty(),
            "the NACKed version is not pushed again"
        );
        assert!(
            s.on_update(&c2).pushes.is_empty(),
            "nor on an unrelated wake-up"
        );
        assert_eq!(s.acked("default"), Some("v1"), "last good version stays");
        let c3 = cat(&[("default", "v3")]);
        assert_eq!(
            names(&s.on_update(&c3)),
            vec![("default", "v3")],
            "next real change goes out"
        );
    }

    #[test]
    fn sotw_stale_nonce_is_ignored_for_subscriptions_but_ack_counts() {
        let mut s = SotwStream::new("s");
        let c = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let o = s.on_request(&sotw(&["default", "ROOTCA"], "", "", None), &c);
        let (n1, n2) = (o.pushes[0].nonce.clone(), o.pushes[1].nonce.clone());
        // ACK of the older response with a changed subscription set: stale for subscriptions.
        let o = s.on_request(&sotw(&["default"], &n1, "r1", None), &c);
        assert_eq!(
            o.events,
            vec![Event::Ack {
                name: "ROOTCA".into(),
                version: "r1".into()
            }]
        );
        assert_eq!(
            s.subscribed().count(),
            2,
            "subscription change from a stale request ignored"
        );
        // A nonce never sent at all.
        let o = s.on_request(&sotw(&[], "bogus", "", None), &c);
        assert_eq!(
            o.events,
            vec![Event::StaleNonce {
                nonce: "bogus".into()
            }]
        );
        assert!(o.pushes.is_empty());
        assert_eq!(s.subscribed().count(), 2);
        // The latest nonce applies.
        let o = s.on_request(&sotw(&["default"], &n2, "v1", None), &c);
        assert!(o.events.contains(&Event::Unsubscribed("ROOTCA".into())));
        assert_eq!(s.subscribed().collect::<Vec<_>>(), vec!["default"]);
    }

    #[test]
    fn sotw_unknown_name_reported_once_then_served_when_it_appears() {
        let mut s = SotwStream::new("s");
        let c = cat(&[("default", "v1")]);
        let o = s.on_request(&sotw(&["default", "frontend"], "", "", None), &c);
        assert_eq!(names(&o), vec![("default", "v1")]);
        assert!(o.events.contains(&Event::Unknown("frontend".into())));
        let n = o.pushes[0].nonce.clone();
        let o = s.on_request(&sotw(&["default", "frontend"], &n, "v1", None), &c);
        assert!(
            !o.events.iter().any(|e| matches!(e, Event::Unknown(_))),
            "reported once"
        );
        assert!(s.on_update(&c).events.is_empty());
        let c2 = cat(&[("default", "v1"), ("frontend", "f1")]);
        assert_eq!(names(&s.on_update(&c2)), vec![("frontend", "f1")]);
    }

    #[test]
    fn sotw_resubscribe_after_unsubscribe_resends() {
        let mut s = SotwStream::new("s");
        let c = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let o = s.on_request(&sotw(&["default"], "", "", None), &c);
        let n = o.pushes[0].nonce.clone();
        let o = s.on_request(&sotw(&["ROOTCA"], &n, "v1", None), &c);
        assert_eq!(names(&o), vec![("ROOTCA", "r1")]);
        let n = o.pushes[0].nonce.clone();
        let o = s.on_request(&sotw(&["ROOTCA", "default"], &n, "r1", None), &c);
        assert_eq!(
            names(&o),
            vec![("default", "v1")],
            "forgotten on unsubscribe, so sent again"
        );
    }

    #[test]
    fn sotw_reconnect_with_current_version_is_not_resent() {
        let c = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let mut s = SotwStream::new("s");
        let o = s.on_request(&sotw(&["default"], "", "v1", None), &c);
        assert!(o.pushes.is_empty());
        assert_eq!(s.acked("default"), Some("v1"));
        let mut s = SotwStream::new("s");
        let o = s.on_request(&sotw(&["default"], "", "v0", None), &c);
        assert_eq!(
            names(&o),
            vec![("default", "v1")],
            "older version: send the current one"
        );
        // version_info names another resource's version: no effect on the others.
        let mut s = SotwStream::new("s");
        let o = s.on_request(&sotw(&["default", "ROOTCA"], "", "r1", None), &c);
        assert_eq!(names(&o), vec![("default", "v1")]);
    }

    #[test]
    fn sotw_empty_names_are_ignored_and_unanswered_names_wait() {
        let mut s = SotwStream::new("s");
        let o = s.on_request(
            &sotw(&["", "default"], "", "", None),
            &cat(&[("default", "v0")]),
        );
        assert_eq!(o.pushes.len(), 1);
        let first = o.pushes[0].nonce.clone();
        // The client does not answer: however often the secret changes, nothing more goes
        // out and nothing piles up.
        for i in 0..(MAX_OUTSTANDING * 3) {
            let c = cat(&[("default", &format!("v{}", i + 1))]);
            assert!(s.on_update(&c).pushes.is_empty());
        }
        assert_eq!(s.outstanding(), 1);
        // Its ACK releases the newest version only.
        let c = cat(&[("default", "last")]);
        assert!(s.on_update(&c).pushes.is_empty());
        let o = s.on_request(&sotw(&["default"], &first, "v0", None), &c);
        assert_eq!(names(&o), vec![("default", "last")]);
        let n = o.pushes[0].nonce.clone();
        let o = s.on_request(&sotw(&["default"], &n, "last", None), &c);
        assert_eq!(
            o.events,
            vec![Event::Ack {
                name: "default".into(),
                version: "last".into()
            }]
        );
        assert!(o.pushes.is_empty());
        // A NACK answers too: the next change goes out.
        let c2 = cat(&[("default", "next")]);
        let n = s.on_update(&c2).pushes[0].nonce.clone();
        let c3 = cat(&[("default", "after")]);
        assert!(s.on_update(&c3).pushes.is_empty());
        let o = s.on_request(&sotw(&["default"], &n, "last", Some("bad")), &c3);
        assert_eq!(names(&o), vec![("default", "after")]);
    }

    #[test]
    fn outstanding_is_bounded_across_names() {
        // Many names pushed at once without an answer: the memory of unanswered responses
        // stays bounded.
        let mut s = SotwStream::new("s");
        let all: Vec<String> = (0..(MAX_OUTSTANDING * 2))
            .map(|i| format!("n{i}"))
            .collect();
        let c: BTreeMap<String, String> = all.iter().map(|n| (n.clone(), "v".into())).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let o = s.on_request(&sotw(&refs, "", "", None), &c);
        assert_eq!(o.pushes.len(), all.len());
        assert!(s.outstanding() <= MAX_OUTSTANDING);
    }

    #[test]
    fn delta_unanswered_names_wait_for_the_ack() {
        let mut d = DeltaStream::new("d");
        let c1 = cat(&[("default", "v1")]);
        let n = d
            .on_request(&delta(&["default"], &[], "", None), &c1)
            .pushes[0]
            .nonce
            .clone();
        assert!(d.on_update(&cat(&[("default", "v2")])).pushes.is_empty());
        let c3 = cat(&[("default", "v3")]);
        assert!(d.on_update(&c3).pushes.is_empty());
        let o = d.on_request(&delta(&[], &[], &n, None), &c3);
        assert_eq!(names(&o), vec![("default", "v3")]);
    }

    fn delta(sub: &[&str], unsub: &[&str], nonce: &str, err: Option<&str>) -> DeltaRequest {
        DeltaRequest {
            response_nonce: nonce.into(),
            subscribe: sub.iter().map(|s| s.to_string()).collect(),
            unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            initial_versions: BTreeMap::new(),
            error_detail: err.map(str::to_string),
        }
    }

    #[test]
    fn delta_subscribe_ack_update_unsubscribe() {
        let mut d = DeltaStream::new("d");
        let c1 = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let o = d.on_request(&delta(&["default"], &[], "", None), &c1);
        assert_eq!(names(&o), vec![("default", "v1")]);
        let n = o.pushes[0].nonce.clone();
        let o = d.on_request(&delta(&[], &[], &n, None), &c1);
        assert_eq!(
            o.events,
            vec![Event::Ack {
                name: "default".into(),
                version: "v1".into()
            }]
        );
        assert!(o.pushes.is_empty());
        // Subscribe to a second name: only it is sent.
        let o = d.on_request(&delta(&["ROOTCA"], &[], "", None), &c1);
        assert_eq!(names(&o), vec![("ROOTCA", "r1")]);
        let n = o.pushes[0].nonce.clone();
        // Subscribing again to a known name is a no-op.
        assert!(d
            .on_request(&delta(&["ROOTCA"], &[], "", None), &c1)
            .pushes
            .is_empty());
        d.on_request(&delta(&[], &[], &n, None), &c1);
        // Change of ROOTCA only.
        let c2 = cat(&[("default", "v1"), ("ROOTCA", "r2")]);
        assert_eq!(names(&d.on_update(&c2)), vec![("ROOTCA", "r2")]);
        // Unsubscribe: no more pushes for it.
        let o = d.on_request(&delta(&[], &["ROOTCA"], "", None), &c2);
        assert_eq!(o.events, vec![Event::Unsubscribed("ROOTCA".into())]);
        let c3 = cat(&[("default", "v1"), ("ROOTCA", "r3")]);
        assert!(d.on_update(&c3).pushes.is_empty());
        assert_eq!(d.subscribed().collect::<Vec<_>>(), vec!["default"]);
    }

    #[test]
    fn delta_nack_not_repushed_and_stale_nonce_still_applies_subscriptions() {
        let mut d = DeltaStream::new("d");
        let c1 = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let n = d
            .on_request(&delta(&["default"], &[], "", None), &c1)
            .pushes[0]
            .nonce
            .clone();
        let o = d.on_request(&delta(&[], &[], &n, Some("no")), &c1);
        assert!(matches!(&o.events[0], Event::Nack { version, .. } if version == "v1"));
        assert!(d.on_update(&c1).pushes.is_empty());
        let o = d.on_request(&delta(&["ROOTCA"], &[], "old-nonce", None), &c1);
        assert_eq!(
            o.events[0],
            Event::StaleNonce {
                nonce: "old-nonce".into()
            }
        );
        assert_eq!(
            names(&o),
            vec![("ROOTCA", "r1")],
            "delta subscriptions apply regardless"
        );
    }

    #[test]
    fn delta_initial_versions_suppress_resend_and_removal_is_announced() {
        let c = cat(&[("default", "v1"), ("ROOTCA", "r1")]);
        let mut d = DeltaStream::new("d");
        let mut req = delta(&["default", "ROOTCA"], &[], "", None);
        req.initial_versions = cat(&[("default", "v1"), ("ROOTCA", "r0"), ("other", "x")]);
        let o = d.on_request(&req, &c);
        assert_eq!(
            names(&o),
            vec![("ROOTCA", "r1")],
            "client already has default v1"
        );
        // A subscribed resource disappears: one removal, then nothing more.
        let c2 = cat(&[("default", "v1")]);
        let o = d.on_update(&c2);
        assert_eq!(o.removals.len(), 1);
        assert_eq!(o.removals[0].names, vec!["ROOTCA".to_string()]);
        assert!(d.on_update(&c2).removals.is_empty());
        // It comes back: sent again.
        assert_eq!(names(&d.on_update(&c)), vec![("ROOTCA", "r1")]);
        // Client reconnects holding a name we no longer have.
        let mut d = DeltaStream::new("d2");
        let mut req = delta(&["gone"], &[], "", None);
        req.initial_versions = cat(&[("gone", "g1")]);
        let o = d.on_request(&req, &c);
        assert_eq!(o.removals[0].names, vec!["gone".to_string()]);
        assert!(o.events.contains(&Event::Unknown("gone".into())));
    }

    #[test]
    fn delta_unknown_then_appears() {
        let mut d = DeltaStream::new("d");
        let c = cat(&[]);
        let o = d.on_request(&delta(&["frontend"], &[], "", None), &c);
        assert!(o.pushes.is_empty() && o.removals.is_empty());
        assert_eq!(
            o.events,
            vec![
                Event::Subscribed("frontend".into()),
                Event::Unknown("frontend".into())
            ]
        );
        assert!(d.on_update(&c).events.is_empty(), "reported once");
        assert_eq!(
            names(&d.on_update(&cat(&[("frontend", "f1")]))),
            vec![("frontend", "f1")]
        );
    }
}
