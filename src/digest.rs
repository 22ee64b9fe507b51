//! History positions and state digests: how the writer and a replica tell
//! whether they share a history and hold the same state.
//!
//! A store's history has an identity, made at random when the store is
//! created, and every revision has a position: a hash chained over the
//! previous position and the committed record. Two stores agree on the
//! position of a revision only if they share the history up to it, so a
//! replica resuming from revision N sends the position it holds and the
//! writer compares it with its own: a writer restored from a backup or one
//! that lost a tail has a different position at N (or no N at all).
//!
//! A digest sums a hash of each object's canonical encoding, so it does
//! not depend on the order objects are visited in; equal digests at equal
//! revisions and positions mean the same state.

use prost::Message;
use ring::digest::{SHA256, digest};

use crate::{model, pb};

/// Bytes kept of a SHA-256 for positions and digests.
pub const HASH_LEN: usize = 16;

/// A new random history identity (32 hex digits).
pub fn new_history_id() -> String {
    let mut bytes = [0u8; HASH_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the operating system's random source failed");
    hex(&bytes)
}

/// The position of revision `revision` of a history that starts there
/// without a chain before it: revision 0 of a new store, or the first
/// revision of a store whose older records carry no position.
pub fn origin(history_id: &str, revision: u64) -> Vec<u8> {
    let mut input = b"flagstream history\0".to_vec();
    input.extend_from_slice(history_id.as_bytes());
    input.push(0);
    input.extend_from_slice(&revision.to_be_bytes());
    truncated(&input)
}

/// The position after a record whose encoding is `record`, following
/// position `previous`.
pub fn next(previous: &[u8], record: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(previous.len() + record.len() + 1);
    input.push(previous.len() as u8);
    input.extend_from_slice(previous);
    input.extend_from_slice(record);
    truncated(&input)
}

/// An order-independent digest of a set of namespaces, flags and segments.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    sum: u128,
    pub namespaces: u64,
    pub flags: u64,
    pub segments: u64,
}

impl Digest {
    pub fn add_namespace(&mut self, namespace: &model::Namespace) {
        self.namespaces += 1;
        self.add(
            b'n',
            &pb::Namespace::from(namespace.clone()).encode_to_vec(),
        );
    }

    pub fn add_flag(&mut self, flag: &model::Flag) {
        self.flags += 1;
        self.add(b'f', &pb::Flag::from(flag.clone()).encode_to_vec());
    }

    pub fn add_segment(&mut self, segment: &model::Segment) {
        self.segments += 1;
        self.add(b's', &pb::Segment::from(segment.clone()).encode_to_vec());
    }

    /// The digest as 32 hex digits.
    pub fn hex(&self) -> String {
        hex(&self.sum.to_be_bytes())
    }

    fn add(&mut self, kind: u8, encoded: &[u8]) {
        let mut input = Vec::with_capacity(encoded.len() + 1);
        input.push(kind);
        input.extend_from_slice(encoded);
        let hash = truncated(&input);
        let value = u128::from_be_bytes(hash.try_into().expect("HASH_LEN is 16"));
        // A sum, not an exclusive or: two equal objects must not cancel.
        self.sum = self.sum.wrapping_add(value);
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn truncated(input: &[u8]) -> Vec<u8> {
    digest(&SHA256, input).as_ref()[..HASH_LEN].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(key: &str) -> model::Namespace {
        model::Namespace {
            key: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn digests_ignore_order_but_not_content_or_multiplicity() {
        let (a, b) = (namespace("a"), namespace("b"));
        let mut one = Digest::default();
        one.add_namespace(&a);
        one.add_namespace(&b);
        let mut two = Digest::default();
        two.add_namespace(&b);
        two.add_namespace(&a);
        assert_eq!(one, two);
        let mut twice = Digest::default();
        twice.add_namespace(&a);
        twice.add_namespace(&a);
        assert_ne!(
            twice.hex(),
            Digest::default().hex(),
            "equal objects must not cancel"
        );
        let mut other = Digest::default();
        other.add_namespace(&a);
        other.add_namespace(&model::Namespace {
            description: "changed".into(),
            ..namespace("b")
        });
        assert_ne!(one.hex(), other.hex());
    }

    #[test]
    fn positions_depend_on_the_whole_history() {
        let start = origin("h1", 0);
        assert_ne!(start, origin("h2", 0), "another history");
        assert_ne!(start, origin("h1", 1), "another revision");
        let p1 = next(&start, b"record 1");
        assert_eq!(p1, next(&start, b"record 1"));
        assert_ne!(p1, next(&start, b"record 1'"));
        assert_ne!(next(&p1, b"x"), next(&origin("h2", 0), b"x"));
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(new_history_id().len(), 32);
        assert_ne!(new_history_id(), new_history_id());
    }
}
