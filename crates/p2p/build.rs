//! Generates the scheduler's gRPC code from `proto/scheduler.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serializable = ["StatusResponse", "PeerView", "TaskView"];
    serializable
        .iter()
        .fold(tonic_build::configure(), |builder, message| {
            builder.type_attribute(
                format!(".darter.p2p.v1.{message}"),
                "#[derive(serde::Serialize)]",
            )
        })
        .compile(&["proto/scheduler.proto"], &["proto"])?;
    Ok(())
}
