//! Generated protobuf types and gRPC services of `flagstream.v1`, plus the one
//! message written by hand ([`EvaluateBatchResponse`], see its module), and
//! flagd's evaluation protocol ([`flagd`]), which flagread also serves.

mod evaluate_batch;

mod generated {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flagstream.v1");
}

/// flagd's evaluation protocol (`proto/flagd/`, copied from open-feature/flagd-schemas), served
/// by flagread so that flagd's OpenFeature providers work against it.
pub mod flagd {
    /// `flagd.evaluation.v1`: the single-flag resolvers, `ResolveAll` and `EventStream`.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("flagd.evaluation.v1");
    }
    /// `flagd.evaluation.v2`: as v1 without `ResolveAll`, with explicit presence of values.
    pub mod v2 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("flagd.evaluation.v2");
    }
}

pub use evaluate_batch::EvaluateBatchResponse;
pub use generated::*;

/// The encoded `FileDescriptorSet` of every proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flagstream_descriptor.bin"));
