//! Compiles every `.proto` under `proto/` into Rust (messages with prost,
//! services with tonic) and writes the file descriptor set that server
//! reflection serves. Uses protox, a pure-Rust protobuf compiler, so a fresh
//! machine needs nothing but cargo.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("flagstream_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps encode in one order, so a message's encoding is
        // canonical (state digests hash encodings).
        .btree_map(".flagstream.v1.Flag.metadata")
        // Written by hand so a replica can put results it encoded itself into
        // it: src/pb/evaluate_batch.rs.
        .extern_path(
            ".flagstream.v1.EvaluateBatchResponse",
            "crate::pb::EvaluateBatchResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}

/// Finds every `.proto` file below `dir`, so adding a file needs no change here.
fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
