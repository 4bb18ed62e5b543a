//! containerd's CRI plugin for tests: its configuration (a snapshotter,
//! snapshot annotations on, plain-HTTP registries, no CNI needed), a
//! sandbox ("pause") image made offline from the host's `sleep`, and a
//! small blocking client of Kubernetes' CRI API (`runtime.v1`) on
//! containerd's socket: pull images, run a host-network pod with one
//! container, read its state.
//!
//! Pods use the node's network namespace, so no CNI plugin runs. CRI's
//! OOM score adjustments are restricted to what containerd's own allows:
//! lowering it needs CAP_SYS_RESOURCE, which test machines may not grant.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Status};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The containerd namespace the CRI plugin keeps its images and
/// containers in.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The sandbox image the CRI plugin is configured with; imported, never
/// pulled.
pub const SANDBOX_IMAGE: &str = "darter.test/pause:1";

/// How [`crate::containerd::Containerd`] configures its CRI plugin.
#[derive(Debug, Clone, Copy)]
pub struct CriOptions<'a> {
    /// The snapshotter CRI pulls and runs with (e.g. a proxy plugin's name).
    pub snapshotter: &'a str,
    /// Registries (`HOST:PORT`) reached over plain HTTP.
    pub plain_http_registries: &'a [&'a str],
}

/// The CRI plugin's part of containerd's config: `dir` is containerd's
/// temp dir (CRI's own root and state go below containerd's).
pub(crate) fn config_toml(dir: &Path, options: &CriOptions<'_>) -> String {
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
    let mut toml = format!(
        "{cri}]\n  sandbox_image = {sandbox}\n  stream_server_address = \"127.0.0.1\"\n  \
         stream_server_port = \"0\"\n  enable_selinux = false\n  \
         restrict_oom_score_adj = true\n\
         {cri}.containerd]\n  snapshotter = {snapshotter}\n  \
         disable_snapshot_annotations = false\n\
         {cri}.cni]\n  bin_dir = {bin}\n  conf_dir = {conf}\n",
        sandbox = toml_str(SANDBOX_IMAGE),
        snapshotter = toml_str(options.snapshotter),
        bin = toml_str(&dir.join("cni/bin").to_string_lossy()),
        conf = toml_str(&dir.join("cni/net.d").to_string_lossy()),
    );
    for host in options.plain_http_registries {
        toml += &format!(
            "{cri}.registry.mirrors.{name}]\n  endpoint = [{endpoint}]\n",
            name = toml_str(host),
            endpoint = toml_str(&format!("http://{host}")),
        );
    }
    toml
}

/// A TOML basic string (JSON's string syntax is one).
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Writes [`SANDBOX_IMAGE`] as an OCI archive (what `ctr images import`
/// takes) to `path`: one layer with the host's `sleep` and the libraries
/// it loads, its entrypoint `sleep infinity`.
pub fn write_sandbox_image(path: &Path) -> io::Result<()> {
    let layer = sleep_layer()?;
    let diff_id = sha256(&layer);
    let config = json_bytes(&json!({
        "architecture": oci_architecture(),
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "infinity"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))?;
    let manifest = json_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": diff_id,
            "size": layer.len(),
        }],
    }))?;
    let index = json_bytes(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": SANDBOX_IMAGE},
        }],
    }))?;
    let mut archive = tar::Builder::new(std::fs::File::create(path)?);
    append_file(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append_file(&mut archive, "index.json", &index)?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", hex::encode(Sha256::digest(blob)));
        append_file(&mut archive, &name, blob)?;
    }
    archive.into_inner()?.sync_all()
}

/// A tar of `/bin/sleep` and every library `ldd` says it loads, each at
/// the path it is loaded from.
fn sleep_layer() -> io::Result<Vec<u8>> {
    let ldd = std::process::Command::new("ldd")
        .arg("/bin/sleep")
        .output()?;
    if !ldd.status.success() {
        return Err(io::Error::other(format!("ldd /bin/sleep: {}", ldd.status)));
    }
    let libraries = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|line| {
            let path = line.rsplit_once("=>").map_or(line, |(_, p)| p);
            path.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
        })
        .map(PathBuf::from)
        .collect::<Vec<_>>();
    let mut layer = tar::Builder::new(Vec::new());
    for file in std::iter::once(PathBuf::from("/bin/sleep")).chain(libraries) {
        let bytes = std::fs::read(&file)?;
        let name = file.strip_prefix("/").unwrap_or(&file);
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        layer.append_data(&mut header, name, bytes.as_slice())?;
    }
    layer.into_inner()
}

fn append_file<W: io::Write>(
    archive: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    archive.append_data(&mut header, name, data)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn json_bytes(value: &serde_json::Value) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// The OCI name of the machine's architecture.
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The CRI client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot start a runtime for the CRI client: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot connect to CRI at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A blocking CRI client (image and runtime services) on one socket.
#[derive(Debug)]
pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

/// A pod sandbox (host network) and one container in it, as
/// [`CriClient::run_container`] started them.
#[derive(Debug, Clone)]
pub struct PodContainer {
    pub pod_id: String,
    pub container_id: String,
    /// The container's log file (CRI's format: `TIME STREAM TAG LINE`).
    pub log_path: PathBuf,
}

impl CriClient {
    /// Connects to the CRI services on containerd's socket.
    pub fn connect(socket: &Path) -> Result<CriClient, CriError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let channel = runtime
            .block_on(containerd_client::connect(socket))
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(CriClient { runtime, channel })
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    fn containers(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// `PullImage`: the image's id (its config digest).
    pub fn pull_image(&self, image: &str) -> Result<String, Status> {
        let request = cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        };
        let response = self.runtime.block_on(self.images().pull_image(request))?;
        Ok(response.into_inner().image_ref)
    }

    /// `ImageStatus`: the image's id, if CRI knows the image.
    pub fn image_id(&self, image: &str) -> Result<Option<String>, Status> {
        let request = cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let response = self.runtime.block_on(self.images().image_status(request))?;
        Ok(response.into_inner().image.map(|i| i.id))
    }

    /// `RemoveImage`.
    pub fn remove_image(&self, image: &str) -> Result<(), Status> {
        let request = cri::RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        self.runtime.block_on(self.images().remove_image(request))?;
        Ok(())
    }

    /// Runs a pod sandbox `name` in the node's network namespace with its
    /// logs in `log_dir`, and in it a container of `image` running
    /// `command`.
    pub fn run_container(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        log_dir: &Path,
    ) -> Result<PodContainer, Status> {
        let pod_config = pod_config(name, log_dir);
        let mut client = self.containers();
        self.runtime.block_on(async {
            let pod_id = client
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod_config.clone()),
                    runtime_handler: String::new(),
                })
                .await?
                .into_inner()
                .pod_sandbox_id;
            let log_name = format!("{name}.log");
            let config = cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.to_owned(),
                    attempt: 0,
                }),
                image: Some(image_spec(image)),
                command: command.iter().map(|&c| c.to_owned()).collect(),
                log_path: log_name.clone(),
                ..Default::default()
            };
            let container_id = client
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod_config),
                })
                .await?
                .into_inner()
                .container_id;
            client
                .start_container(cri::StartContainerRequest {
                    container_id: container_id.clone(),
                })
                .await?;
            Ok(PodContainer {
                pod_id,
                container_id,
                log_path: log_dir.join(log_name),
            })
        })
    }

    /// `ContainerStatus`: the container's state and exit code.
    pub fn container_state(
        &self,
        container_id: &str,
    ) -> Result<(cri::ContainerState, i32), Status> {
        let request = cri::ContainerStatusRequest {
            container_id: container_id.to_owned(),
            verbose: false,
        };
        let response = self
            .runtime
            .block_on(self.containers().container_status(request))?;
        let status = response
            .into_inner()
            .status
            .ok_or_else(|| Status::not_found(format!("no status of container {container_id}")))?;
        Ok((status.state(), status.exit_code))
    }

    /// Waits (polling) until the container has exited; its exit code.
    pub fn wait_exited(&self, container_id: &str, timeout: Duration) -> Result<i32, Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let (state, code) = self.container_state(container_id)?;
            if state == cri::ContainerState::ContainerExited {
                return Ok(code);
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "container {container_id} still {state:?} after {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops and removes the pod and its containers.
    pub fn remove_pod(&self, pod_id: &str) -> Result<(), Status> {
        let mut client = self.containers();
        self.runtime.block_on(async {
            client
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod_id.to_owned(),
                })
                .await?;
            client
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod_id.to_owned(),
                })
                .await?;
            Ok(())
        })
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        annotations: HashMap::new(),
        ..Default::default()
    }
}

/// A pod `name` in the node's network namespace (no CNI), logging to
/// `log_dir`.
fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    let namespaces = cri::NamespaceOption {
        network: cri::NamespaceMode::Node.into(),
        pid: cri::NamespaceMode::Container.into(),
        ipc: cri::NamespaceMode::Pod.into(),
        ..Default::default()
    };
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "darter-test".to_owned(),
            attempt: 0,
        }),
        log_directory: log_dir.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sets_the_snapshotter_annotations_and_plain_http_registries() {
        let toml = config_toml(
            Path::new("/t/c"),
            &CriOptions {
                snapshotter: "darter",
                plain_http_registries: &["127.0.0.1:5000"],
            },
        );
        for needle in [
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"darter\"\n  \
             disable_snapshot_annotations = false\n",
            "sandbox_image = \"darter.test/pause:1\"",
            "conf_dir = \"/t/c/cni/net.d\"",
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"127.0.0.1:5000\"]\n  \
             endpoint = [\"http://127.0.0.1:5000\"]\n",
        ] {
            assert!(toml.contains(needle), "{needle} in\n{toml}");
        }
    }
}
