//! `darter pull`: makes an image runnable in containerd. For a Darter
//! image nothing is downloaded: it writes the manifest and config into
//! containerd's content store, prepares each layer's snapshot with the
//! labels of the remote-snapshot protocol (the Darter snapshotter commits
//! them itself, the last one as a lazy mount of the whole image) and
//! records the image. A plain image is pulled in full, as containerd's own
//! pull does: layers into the content store, each unpacked by containerd's
//! diff service into a snapshot, and the top layer's Prepare carries the
//! label [`LABEL_FALLBACK`], so that the Darter snapshotter counts the
//! fallback (a label rides on the request containerd forwards anyway: no
//! second channel to the snapshotter, nothing to configure, and other
//! snapshotters ignore it). Everything happens under a containerd lease,
//! so containerd's garbage collector cannot take half a pull away.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest, Image, Info,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor;
use darter_image::BlobSource;
use darter_oci::{ImageConfiguration, OciDigest};
use darter_remote::{ImageRef, Stores};
use darter_snapshotter::{FallbackReason, LABEL_FALLBACK, LABEL_IMAGE_REF, LABEL_TARGET};
use sha2::{Digest as _, Sha256};

use crate::cli::PullArgs;

use super::{Context, Outcome, image_ref};

/// How long containerd keeps what an interrupted pull left.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// Bytes of a plain layer read from the registry and sent to containerd
/// at once.
const LAYER_PIECE: u64 = 4 << 20;

/// An image's manifest and config, as a registry (or layout) served them,
/// and the means to read its layers.
pub(super) struct FetchedImage {
    /// The image pinned to its manifest digest (what the mounts serve).
    pub pinned: String,
    pub manifest: Blob,
    pub config: Blob,
    /// `rootfs.diff_ids`; for a Darter image the blobs', then the
    /// bootstrap's.
    pub diff_ids: Vec<String>,
    /// Whether it is a Darter image (its last layer a Darter bootstrap).
    pub is_darter: bool,
    /// The layers' descriptors: media type, digest, size.
    layers: Vec<(String, OciDigest, u64)>,
    blobs: Box<dyn BlobSource>,
}

/// A blob's descriptor and verified bytes.
pub(super) struct Blob {
    pub media_type: String,
    pub digest: OciDigest,
    pub bytes: Vec<u8>,
}

impl FetchedImage {
    /// Reads `image`'s manifest and config.
    pub(super) fn fetch(stores: &Stores, image: &ImageRef) -> anyhow::Result<FetchedImage> {
        let opened = stores
            .open_manifest(image, None)
            .with_context(|| format!("reading the manifest of {image}"))?;
        let layers = opened.manifest.layers();
        let is_darter = layers
            .last()
            .is_some_and(|l| darter_format::oci::is_bootstrap_media_type(l.media_type().as_ref()));
        let layer_descriptors = layers
            .iter()
            .map(|l| {
                let digest = darter_oci::descriptor_digest(l)
                    .with_context(|| format!("a layer descriptor of {image}"))?;
                Ok((l.media_type().to_string(), digest, l.size()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let desc = opened.manifest.config();
        let digest = darter_oci::descriptor_digest(desc)
            .with_context(|| format!("the config descriptor of {image}"))?;
        let bytes = opened
            .blobs
            .read_range(&digest, 0, desc.size())
            .with_context(|| format!("reading the config {digest} of {image}"))?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != digest.to_string() {
            bail!("the config of {image} is {actual}, its manifest says {digest}");
        }
        let config: ImageConfiguration = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing the config {digest} of {image}"))?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != layers.len() {
            bail!(
                "the config {digest} of {image} lists {} diff_ids for {} layers",
                diff_ids.len(),
                layers.len()
            );
        }
        let pinned = match image {
            ImageRef::Registry(r) => format!("{}@{}", r.repository(), opened.digest),
            ImageRef::Layout(_) => image.to_string(),
        };
        Ok(FetchedImage {
            pinned,
            manifest: Blob {
                media_type: opened.media_type,
                digest: opened.digest,
                bytes: opened.bytes,
            },
            config: Blob {
                media_type: desc.media_type().to_string(),
                digest,
                bytes,
            },
            diff_ids,
            is_darter,
            layers: layer_descriptors,
            blobs: opened.blobs,
        })
    }
}

pub fn run(args: &PullArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let reference = image_ref(&args.image)?;
    let image = FetchedImage::fetch(ctx.stores(), &reference)?;
    let name = args.image.strip_prefix("docker://").unwrap_or(&args.image);
    if !image.is_darter {
        println!("{name}: not a Darter image: pulling in full");
    }
    // A multi-threaded runtime: reading a plain image's layers blocks (on
    // the registry client's own runtime), which `block_in_place` allows.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting an async runtime")?;
    let target = runtime.block_on(pull(args, name, &image))?;
    let how = if image.is_darter {
        "none downloaded"
    } else {
        "all downloaded and unpacked"
    };
    println!(
        "pulled {name} ({}): {} layers, {how}; top snapshot {target} in {}",
        image.manifest.digest,
        image.diff_ids.len(),
        args.snapshotter
    );
    Ok(Outcome::Success)
}

/// The containerd side of a pull, under a lease deleted at the end;
/// returns the top layer's chain ID.
async fn pull(args: &PullArgs, name: &str, image: &FetchedImage) -> anyhow::Result<String> {
    let channel = connect(&args.address).await?;
    let ns = args.namespace.as_str();
    let lease = format!(
        "darter-pull-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let expiry = humantime::format_rfc3339_seconds(SystemTime::now() + LEASE_EXPIRY).to_string();
    let create = CreateRequest {
        id: lease.clone(),
        labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expiry)]),
    };
    LeasesClient::new(channel.clone())
        .create(request(create, ns, None)?)
        .await
        .context("creating a containerd lease")?;
    let result = pull_leased(&channel, args, ns, &lease, name, image).await;
    let delete = DeleteRequest {
        id: lease.clone(),
        sync: false,
    };
    if let Err(err) = LeasesClient::new(channel)
        .delete(request(delete, ns, None)?)
        .await
    {
        tracing::warn!(lease, %err, "cannot delete the pull's lease; it expires by itself");
    }
    result
}

async fn pull_leased(
    channel: &Channel,
    args: &PullArgs,
    ns: &str,
    lease: &str,
    name: &str,
    image: &FetchedImage,
) -> anyhow::Result<String> {
    let chain = darter_snapshotter::chain_ids(&image.diff_ids);
    let top = chain.last().context("an image without layers")?.clone();
    let mut content = ContentClient::new(channel.clone());
    let config_labels = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{}", args.snapshotter),
        top.clone(),
    )]);
    write_content(&mut content, ns, lease, &image.config, config_labels).await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        image.config.digest.to_string(),
    )]);
    if !image.is_darter {
        for (i, (_, digest, _)) in image.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                digest.to_string(),
            );
        }
    }
    write_content(&mut content, ns, lease, &image.manifest, manifest_labels).await?;

    let mut snapshots = SnapshotsClient::new(channel.clone());
    for (i, chain_id) in chain.iter().enumerate() {
        let layer = Layer {
            snapshotter: &args.snapshotter,
            ns,
            lease,
            chain_id,
            parent: if i == 0 { "" } else { chain[i - 1].as_str() },
        };
        let done = if image.is_darter {
            layer.prepare_remote(&mut snapshots, &image.pinned).await
        } else {
            layer.unpack(channel, &mut snapshots, image, i).await
        };
        done.with_context(|| format!("layer {i} ({chain_id}) of {name}"))?;
    }

    let record = Image {
        name: name.to_owned(),
        labels: HashMap::new(),
        target: Some(descriptor(&image.manifest)),
        ..Image::default()
    };
    let mut images = ImagesClient::new(channel.clone());
    let created = CreateImageRequest {
        image: Some(record.clone()),
        ..CreateImageRequest::default()
    };
    match images.create(request(created, ns, Some(lease))?).await {
        Ok(_) => {}
        Err(status) if status.code() == Code::AlreadyExists => {
            let update = UpdateImageRequest {
                image: Some(record),
                ..UpdateImageRequest::default()
            };
            images
                .update(request(update, ns, Some(lease))?)
                .await
                .with_context(|| format!("updating the image record {name}"))?;
        }
        Err(status) => {
            return Err(status).with_context(|| format!("creating the image record {name}"));
        }
    }
    Ok(top)
}

/// One layer's snapshot in a namespace of containerd, under a lease.
struct Layer<'a> {
    snapshotter: &'a str,
    ns: &'a str,
    lease: &'a str,
    chain_id: &'a str,
    parent: &'a str,
}

impl Layer<'_> {
    fn key(&self) -> String {
        format!("extract-{} {}", self.lease, self.chain_id)
    }

    fn request<T>(&self, message: T) -> anyhow::Result<Request<T>> {
        request(message, self.ns, Some(self.lease))
    }

    /// Asks for the layer as a remote snapshot. The Darter snapshotter
    /// answers AlreadyExists once it is committed; a snapshot it prepares
    /// instead would need unpacking, which Darter blobs are not made for,
    /// so it is removed again and the pull fails.
    async fn prepare_remote(
        &self,
        snapshots: &mut SnapshotsClient<Channel>,
        pinned: &str,
    ) -> anyhow::Result<()> {
        let labels = HashMap::from([
            (LABEL_TARGET.to_owned(), self.chain_id.to_owned()),
            (LABEL_IMAGE_REF.to_owned(), pinned.to_owned()),
        ]);
        match snapshots.prepare(self.request(self.prepare(labels))?).await {
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(status).context("preparing its snapshot"),
            Ok(_) => {
                self.remove_prepared(snapshots).await;
                bail!(
                    "snapshotter {:?} prepared it for unpacking instead of providing it: \
                     is it `darter snapshotter`, and can it read the image? (its log says)",
                    self.snapshotter
                )
            }
        }
    }

    /// Downloads the layer `index` of `image` into the content store and
    /// has containerd's diff service unpack it into a new snapshot,
    /// committed as the layer's chain ID (unless that is there already).
    /// The top layer's Prepare reports the fallback: an image counts once,
    /// and only when it is unpacked.
    async fn unpack(
        &self,
        channel: &Channel,
        snapshots: &mut SnapshotsClient<Channel>,
        image: &FetchedImage,
        index: usize,
    ) -> anyhow::Result<()> {
        let stat = StatSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: self.chain_id.to_owned(),
        };
        if snapshots.stat(self.request(stat)?).await.is_ok() {
            return Ok(());
        }
        let (media_type, digest, size) = &image.layers[index];
        let diff_id = &image.diff_ids[index];
        let labels = HashMap::from([("containerd.io/uncompressed".to_owned(), diff_id.clone())]);
        let mut content = ContentClient::new(channel.clone());
        write_layer(&mut content, self, image, index, labels).await?;
        let mut prepare_labels = HashMap::new();
        if index + 1 == image.diff_ids.len() {
            prepare_labels.extend([
                (
                    LABEL_FALLBACK.to_owned(),
                    FallbackReason::NotDarter.name().to_owned(),
                ),
                (LABEL_IMAGE_REF.to_owned(), image.pinned.clone()),
            ]);
        }
        let mounts = snapshots
            .prepare(self.request(self.prepare(prepare_labels))?)
            .await
            .context("preparing its snapshot")?
            .into_inner()
            .mounts;
        let apply = ApplyRequest {
            diff: Some(Descriptor {
                media_type: media_type.clone(),
                digest: digest.to_string(),
                size: i64::try_from(*size).unwrap_or(i64::MAX),
                annotations: HashMap::new(),
            }),
            mounts,
            ..ApplyRequest::default()
        };
        let applied = match DiffClient::new(channel.clone())
            .apply(self.request(apply)?)
            .await
        {
            Ok(response) => response.into_inner().applied.map(|d| d.digest),
            Err(status) => {
                self.remove_prepared(snapshots).await;
                return Err(status).context("unpacking it");
            }
        };
        if applied.as_deref() != Some(diff_id.as_str()) {
            self.remove_prepared(snapshots).await;
            bail!("unpacked it to {applied:?}, the config says {diff_id}");
        }
        let commit = CommitSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            name: self.chain_id.to_owned(),
            key: self.key(),
            labels: HashMap::from([(LABEL_TARGET.to_owned(), self.chain_id.to_owned())]),
        };
        match snapshots.commit(self.request(commit)?).await {
            Ok(_) => Ok(()),
            // Unpacked meanwhile by another pull.
            Err(status) if status.code() == Code::AlreadyExists => {
                self.remove_prepared(snapshots).await;
                Ok(())
            }
            Err(status) => Err(status).context("committing its snapshot"),
        }
    }

    fn prepare(&self, labels: HashMap<String, String>) -> PrepareSnapshotRequest {
        PrepareSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: self.key(),
            parent: self.parent.to_owned(),
            labels,
        }
    }

    /// Removes the snapshot this pull prepared (logged if it cannot: once
    /// the lease is gone containerd collects it).
    async fn remove_prepared(&self, snapshots: &mut SnapshotsClient<Channel>) {
        let remove = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: self.key(),
        };
        let removed = match self.request(remove) {
            Ok(request) => snapshots.remove(request).await.map_err(anyhow::Error::from),
            Err(err) => Err(err),
        };
        if let Err(err) = removed {
            tracing::warn!(key = self.key(), %err, "cannot remove a prepared snapshot");
        }
    }
}

/// Streams the layer `index` of `image` from where it lives into
/// containerd's content store, a piece at a time, with `labels`; a layer
/// already there gets the labels.
async fn write_layer(
    content: &mut ContentClient<Channel>,
    layer: &Layer<'_>,
    image: &FetchedImage,
    index: usize,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let (_, digest, size) = &image.layers[index];
    let size = *size;
    let total = i64::try_from(size).context("a layer too large")?;
    let reference = format!("{}-{digest}", layer.lease);
    let message = |action: WriteAction, offset: u64, data: Vec<u8>| WriteContentRequest {
        action: action as i32,
        r#ref: reference.clone(),
        total,
        expected: digest.to_string(),
        offset: i64::try_from(offset).unwrap_or(i64::MAX),
        data,
        labels: if action == WriteAction::Commit {
            labels.clone()
        } else {
            HashMap::new()
        },
    };
    let (pieces, stream) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
    let send = async {
        let mut offset = 0;
        while offset < size {
            let len = LAYER_PIECE.min(size - offset);
            // A blocking read (the registry client has a runtime of its own).
            let data = tokio::task::block_in_place(|| image.blobs.read_range(digest, offset, len))
                .with_context(|| format!("reading layer {digest} at {offset}"))?;
            if pieces
                .send(message(WriteAction::Write, offset, data))
                .await
                .is_err()
            {
                // The write failed; `receive` says why.
                return Ok(());
            }
            offset += len;
        }
        let _ = pieces
            .send(message(WriteAction::Commit, size, Vec::new()))
            .await;
        Ok::<(), anyhow::Error>(())
    };
    let stream = tokio_stream::wrappers::ReceiverStream::new(stream);
    let digest = digest.to_string();
    let receive = write_stream(
        content,
        layer.ns,
        layer.lease,
        &digest,
        stream,
        labels.clone(),
    );
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    received
}

/// Writes `blob` into containerd's content store with `labels` (set on
/// the existing one if it is there already).
async fn write_content(
    content: &mut ContentClient<Channel>,
    ns: &str,
    lease: &str,
    blob: &Blob,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let digest = blob.digest.to_string();
    let size = i64::try_from(blob.bytes.len()).context("a blob too large")?;
    let write = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: format!("{lease}-{digest}"),
        total: size,
        expected: digest.clone(),
        offset: 0,
        data: blob.bytes.clone(),
        labels: labels.clone(),
    };
    write_stream(
        content,
        ns,
        lease,
        &digest,
        tokio_stream::iter([write]),
        labels,
    )
    .await
}

/// Sends the write requests `stream` (for the blob `digest`) to
/// containerd's content store; a blob already there gets `labels`.
async fn write_stream(
    content: &mut ContentClient<Channel>,
    ns: &str,
    lease: &str,
    digest: &str,
    stream: impl tokio_stream::Stream<Item = WriteContentRequest> + Send + 'static,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let written = async {
        let mut responses = content
            .write(request(stream, ns, Some(lease))?)
            .await?
            .into_inner();
        while responses.message().await?.is_some() {}
        Ok::<(), anyhow::Error>(())
    }
    .await;
    match written {
        Ok(()) => Ok(()),
        Err(err) if is_already_exists(&err) => {
            label_content(content, ns, lease, digest, labels).await
        }
        Err(err) => Err(err.context(format!("writing {digest} into containerd's content store"))),
    }
}

/// Sets `labels` on the blob `digest` in containerd's content store.
async fn label_content(
    content: &mut ContentClient<Channel>,
    ns: &str,
    lease: &str,
    digest: &str,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    let update = UpdateRequest {
        info: Some(Info {
            digest: digest.to_owned(),
            labels,
            ..Info::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    };
    content
        .update(request(update, ns, Some(lease))?)
        .await
        .with_context(|| format!("labelling {digest} in containerd's content store"))?;
    Ok(())
}

fn is_already_exists(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Status>()
        .is_some_and(|s| s.code() == Code::AlreadyExists)
}

fn descriptor(blob: &Blob) -> Descriptor {
    Descriptor {
        media_type: blob.media_type.clone(),
        digest: blob.digest.to_string(),
        size: i64::try_from(blob.bytes.len()).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

async fn connect(address: &Path) -> anyhow::Result<Channel> {
    containerd_client::connect(address)
        .await
        .with_context(|| format!("connecting to containerd at {}", address.display()))
}

/// `message` in containerd's namespace `ns`, under `lease` if given.
fn request<T>(message: T, ns: &str, lease: Option<&str>) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert(
        "containerd-namespace",
        ns.parse()
            .with_context(|| format!("namespace {ns:?} is no header value"))?,
    );
    if let Some(lease) = lease {
        metadata.insert("containerd-lease", lease.parse()?);
    }
    Ok(request)
}
