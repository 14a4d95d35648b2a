//! Compiles the protos with protox (pure Rust), so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=chaos");
    let fds = protox::compile(
        [
            "chaos/agent/v1/agent.proto",
            "chaos/experiments/v1/experiments.proto",
            "chaos/fleet/v1/fleet.proto",
        ],
        ["."],
    )?;
    // Undecodable requests are the caller's fault: INVALID_ARGUMENT, not tonic's INTERNAL.
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(fds)?;
    Ok(())
}
