//! Evaluation results encoded straight to protobuf bytes, for the calls that
//! answer many flags at once (EvaluateBatch, EvaluateAll).
//!
//! Most of an `EvaluateResponse` depends on the flag alone (key, type,
//! revision, metadata) or on the variant served (value and name). Those
//! pieces are encoded once per flag version into an [`EncodedFlag`]; a result
//! is then those bytes around the few fields that depend on the evaluation
//! (reason, rule index, revision). Fields come out in field-number order,
//! exactly as prost writes a whole `EvaluateResponse`. Results that carry an
//! error (rare: a missing flag in a batch, a misconfigured flag) go through
//! [`super::evaluation`] instead.

use prost::Message;
use prost::encoding::{self, WireType};

use super::{evaluation, flag_fields, rule_index};
use crate::engine::{CompiledFlag, Evaluation};
use crate::pb;

// Field numbers of `EvaluateResponse` written here.
const REASON: u32 = 4;
const RULE_INDEX: u32 = 7;
const REVISION: u32 = 8;

/// The parts of a flag's `EvaluateResponse` that do not depend on the
/// evaluation, encoded: one allocation for the bytes, one for the offsets.
#[derive(Debug)]
pub struct EncodedFlag {
    /// `flag_key` (field 1); then per variant, in the flag's order, `value`
    /// and `variant` (fields 2, 3); then `flag_revision`, `type` and
    /// `metadata` (fields 9–11).
    bytes: Box<[u8]>,
    /// Where the key ends, then where each variant's part ends; the tail runs
    /// from the last to the end.
    ends: Box<[u32]>,
}

impl EncodedFlag {
    /// Encodes the evaluation-independent parts of `flag`'s results.
    pub fn new(flag: &CompiledFlag) -> EncodedFlag {
        let source = flag.source();
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(source.variants.len() + 1);
        let put = |part: pb::EvaluateResponse, bytes: &mut Vec<u8>| {
            part.encode(bytes).expect("a Vec grows as needed");
            u32::try_from(bytes.len()).expect("a flag's encoding is far below 4 GiB")
        };
        let key = pb::EvaluateResponse {
            flag_key: source.key.clone(),
            ..Default::default()
        };
        ends.push(put(key, &mut bytes));
        for variant in &source.variants {
            let part = pb::EvaluateResponse {
                value: Some(pb::TypedValue::from(&variant.value)),
                variant: variant.name.clone(),
                ..Default::default()
            };
            ends.push(put(part, &mut bytes));
        }
        put(flag_fields(flag), &mut bytes);
        EncodedFlag {
            bytes: bytes.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
        }
    }

    fn key(&self) -> &[u8] {
        &self.bytes[..self.ends[0] as usize]
    }

    /// The value and name of variant `index`, if the flag has it.
    fn variant(&self, index: usize) -> Option<&[u8]> {
        let start = *self.ends.get(index)? as usize;
        let end = *self.ends.get(index + 1)? as usize;
        Some(&self.bytes[start..end])
    }

    fn tail(&self) -> &[u8] {
        let start = *self.ends.last().expect("the key's end is always there") as usize;
        &self.bytes[start..]
    }
}

/// Appends the result of `eval` for flag `key`, as a length-delimited field
/// `tag` (a `results` entry of `EvaluateBatchResponse`). The bytes decode to
/// exactly what [`super::evaluation`] returns. `encoded` must be the
/// [`EncodedFlag`] of the flag `eval` evaluated; without it, or for an
/// evaluation that failed, the result is built and encoded the slow way.
pub fn append_result(
    buf: &mut Vec<u8>,
    tag: u32,
    key: &str,
    eval: &Evaluation<'_>,
    encoded: Option<&EncodedFlag>,
    revision: u64,
) {
    let pieces = match (eval.error, eval.variant_index, encoded) {
        (None, Some(index), Some(encoded)) => encoded
            .variant(index)
            .map(|variant| (encoded.key(), variant, encoded.tail())),
        _ => None,
    };
    let Some((head, variant, tail)) = pieces else {
        encoding::message::encode(tag, &evaluation(key, eval, revision), buf);
        return;
    };
    let reason = pb::Reason::from(eval.reason) as i32;
    let rule_index = rule_index(eval);
    // proto3: fields at their default value are not written.
    let middle = if reason != 0 {
        encoding::int32::encoded_len(REASON, &reason)
    } else {
        0
    } + if rule_index != 0 {
        encoding::int32::encoded_len(RULE_INDEX, &rule_index)
    } else {
        0
    } + if revision != 0 {
        encoding::uint64::encoded_len(REVISION, &revision)
    } else {
        0
    };
    let len = head.len() + variant.len() + middle + tail.len();
    buf.reserve(len + 16);
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(len as u64, buf);
    buf.extend_from_slice(head);
    buf.extend_from_slice(variant);
    if reason != 0 {
        encoding::int32::encode(REASON, &reason, buf);
    }
    if rule_index != 0 {
        encoding::int32::encode(RULE_INDEX, &rule_index, buf);
    }
    if revision != 0 {
        encoding::uint64::encode(REVISION, &revision, buf);
    }
    buf.extend_from_slice(tail);
}
