//! Generated protobuf types and gRPC services of `flagstream.v1`, plus the one
//! message written by hand ([`EvaluateBatchResponse`], see its module).

mod evaluate_batch;

mod generated {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flagstream.v1");
}

pub use evaluate_batch::EvaluateBatchResponse;
pub use generated::*;

/// The encoded `FileDescriptorSet` of every proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flagstream_descriptor.bin"));
