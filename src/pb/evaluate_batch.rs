//! `flagstream.v1.EvaluateBatchResponse`, written by hand instead of generated
//! (`build.rs` maps the proto message here with `extern_path`).
//!
//! EvaluateAll answers every flag of a namespace, and building one
//! `EvaluateResponse` per flag (key, variant and value strings, a metadata
//! map) only to encode it and drop it was most of the call's cost. This type
//! adds one field to the generated shape, [`encoded_results`]: results the
//! replica encoded itself from pieces it prepared when the flag was loaded
//! (`crate::convert::EncodedFlag`). On the wire nothing changes: those bytes are
//! `results` entries like any other, and decoding puts every entry in
//! [`results`].
//!
//! [`encoded_results`]: EvaluateBatchResponse::encoded_results
//! [`results`]: EvaluateBatchResponse::results

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};

use super::EvaluateResponse;

/// The results of EvaluateBatch and EvaluateAll.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct EvaluateBatchResponse {
    /// One result per key asked for (EvaluateBatch, same order) or per flag of
    /// the namespace ordered by key (EvaluateAll). A decoded message has all
    /// of them here.
    pub results: Vec<EvaluateResponse>,
    /// The replica's applied revision; all results were computed at it.
    pub revision: u64,
    /// More `results` entries, already encoded: each a complete field-1
    /// record (key, length, `EvaluateResponse` bytes). Written after
    /// `results`; never filled by decoding. Whoever fills it is responsible
    /// for it being well-formed.
    pub encoded_results: Vec<u8>,
}

const RESULTS: u32 = 1;
const REVISION: u32 = 2;

impl prost::Message for EvaluateBatchResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(RESULTS, &self.results, buf);
        buf.put_slice(&self.encoded_results);
        if self.revision != 0 {
            encoding::uint64::encode(REVISION, &self.revision, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        let field = match tag {
            RESULTS => encoding::message::merge_repeated(wire_type, &mut self.results, buf, ctx)
                .map_err(|e| (e, "results")),
            REVISION => encoding::uint64::merge(wire_type, &mut self.revision, buf, ctx)
                .map_err(|e| (e, "revision")),
            _ => return encoding::skip_field(wire_type, tag, buf, ctx),
        };
        field.map_err(|(mut error, name)| {
            error.push("EvaluateBatchResponse", name);
            error
        })
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(RESULTS, &self.results)
            + self.encoded_results.len()
            + if self.revision != 0 {
                encoding::uint64::encoded_len(REVISION, &self.revision)
            } else {
                0
            }
    }

    fn clear(&mut self) {
        self.results.clear();
        self.revision = 0;
        self.encoded_results.clear();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::pb;

    fn result(key: &str, variant: &str) -> EvaluateResponse {
        EvaluateResponse {
            flag_key: key.into(),
            variant: variant.into(),
            reason: pb::Reason::Static as i32,
            rule_index: -1,
            revision: 7,
            metadata: [("owner".to_string(), "growth".to_string())].into(),
            ..EvaluateResponse::default()
        }
    }

    #[test]
    fn encoded_results_decode_as_results_after_the_listed_ones() {
        let mut encoded = Vec::new();
        encoding::message::encode(RESULTS, &result("b", "off"), &mut encoded);
        encoding::message::encode(RESULTS, &result("c", "on"), &mut encoded);
        let message = EvaluateBatchResponse {
            results: vec![result("a", "on")],
            revision: 7,
            encoded_results: encoded,
        };
        let bytes = message.encode_to_vec();
        assert_eq!(bytes.len(), message.encoded_len());
        let decoded = EvaluateBatchResponse::decode(&bytes[..]).unwrap();
        assert_eq!(
            decoded,
            EvaluateBatchResponse {
                results: vec![result("a", "on"), result("b", "off"), result("c", "on")],
                revision: 7,
                encoded_results: Vec::new(),
            }
        );
    }

    #[test]
    fn empty_and_unknown_fields() {
        assert!(EvaluateBatchResponse::default().encode_to_vec().is_empty());
        // An unknown field (tag 15, varint) is skipped, as generated code does.
        let mut bytes = vec![(15 << 3) as u8, 1];
        encoding::uint64::encode(REVISION, &3, &mut bytes);
        let decoded = EvaluateBatchResponse::decode(&bytes[..]).unwrap();
        assert_eq!(decoded.revision, 3);
        assert!(decoded.results.is_empty());
    }

    #[test]
    fn a_truncated_result_names_the_field() {
        let mut bytes = Vec::new();
        encoding::message::encode(RESULTS, &result("a", "on"), &mut bytes);
        bytes.pop();
        let error = EvaluateBatchResponse::decode(&bytes[..]).unwrap_err();
        assert!(
            error.to_string().contains("EvaluateBatchResponse.results"),
            "{error}"
        );
    }
}
