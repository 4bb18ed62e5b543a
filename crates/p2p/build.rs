//! Generates the scheduler's gRPC code from `proto/scheduler.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::compile_protos("proto/scheduler.proto")?;
    Ok(())
}
