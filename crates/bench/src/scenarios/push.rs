//! Rebuild and push after a change (issue 5 scenario 4; the dedup push of
//! issue 4): one 10 MiB file of the python image changes. The OCI way
//! re-pushes the layer that holds it; Darter, converting the new image
//! with `--parent` the previous Darter image, uploads the changed chunks,
//! the new bootstrap and chunk table. Both are measured by the registry's
//! own storage growth (and Darter's by its build report too).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use darter_testkit::fixtures::{self, OciImage};
use darter_testkit::registry::TestRegistry;

use crate::inputs;
use crate::model::{Aim, Bar, Chart, ChartKind, ScenarioReport, Table, Unit, Verdict};
use crate::scenario::{Bench, Scenario};
use crate::tools;
use crate::walk;

/// The file that changes between the two versions.
const CHANGED_FILE: &str = "opt/app/model.bin";
const CHANGED_BYTES: u64 = 10 << 20;
/// Manifests and configs pushed along (a few KiB), allowed over the bound.
const MANIFEST_SLACK: u64 = 64 << 10;

#[derive(Debug)]
pub struct Push;

impl Scenario for Push {
    fn name(&self) -> &'static str {
        "push"
    }

    fn title(&self) -> &'static str {
        "Rebuild and push after a 10 MiB file changes (issues 4, 5)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let scratch = bench.scratch("push")?;
        let versions = Versions::build(bench, scratch.path())?;
        let registry = TestRegistry::start();
        let host = registry.host();
        let storage = registry.storage_dir();
        let repo = |tag: &str| format!("{host}/bench/app:{tag}");

        std::fs::create_dir_all(&storage)
            .with_context(|| format!("creating {}", storage.display()))?;
        let mut steps = Vec::new();
        let mut step = |what: &str, run: &mut dyn FnMut() -> anyhow::Result<Option<Sent>>| {
            let before = walk::walk(&storage, false)?.file_bytes;
            let start = Instant::now();
            let reported = run().with_context(|| what.to_owned())?;
            let seconds = start.elapsed().as_secs_f64();
            let growth = walk::walk(&storage, false)?
                .file_bytes
                .saturating_sub(before);
            steps.push(Step {
                what: what.to_owned(),
                seconds,
                growth,
                reported,
            });
            anyhow::Ok(())
        };
        step("OCI: skopeo copy of version 1", &mut || {
            skopeo_push(&versions.v1, &repo("oci-v1")).map(|()| None)
        })?;
        step("OCI: skopeo copy of version 2", &mut || {
            skopeo_push(&versions.v2, &repo("oci-v2")).map(|()| None)
        })?;
        step("Darter: convert version 1", &mut || {
            darter_build(bench, &repo("oci-v1"), &repo("darter-v1"), None).map(Some)
        })?;
        step(
            "Darter: convert version 2 with --parent version 1",
            &mut || {
                darter_build(
                    bench,
                    &repo("oci-v2"),
                    &repo("darter-v2"),
                    Some(&repo("darter-v1")),
                )
                .map(Some)
            },
        )?;
        Ok(report(&versions, &steps))
    }
}

/// The two versions of the image as plain OCI layouts: the minbase layer,
/// then python3 plus the 10 MiB file (the layer a rebuild replaces).
struct Versions {
    v1: OciImage,
    v2: OciImage,
    changed_layer: u64,
}

impl Versions {
    fn build(bench: &Bench, dir: &Path) -> anyhow::Result<Versions> {
        let minbase = fixtures::debian_minbase_rootfs().context("the minbase rootfs fixture")?;
        let python = bench.python_rootfs()?;
        let mut images = Vec::new();
        for seed in [1u64, 2] {
            let tree = dir.join(format!("tree-v{seed}"));
            // Hard links: the trees share every file but the changed one.
            tools::output(Command::new("cp").arg("-al").arg(&python).arg(&tree))?;
            let file = tree.join(CHANGED_FILE);
            std::fs::create_dir_all(file.parent().unwrap_or(&tree))
                .with_context(|| format!("creating the directory of {}", file.display()))?;
            inputs::write_random(&file, CHANGED_BYTES, seed)?;
            let layout = dir.join(format!("oci-v{seed}"));
            images.push(
                fixtures::oci_layout_from_dirs(&layout, "app", &[&minbase, &tree])
                    .with_context(|| format!("umoci image of {}", tree.display()))?,
            );
        }
        let sizes_v1 = inputs::oci_layer_sizes(&images[0])?;
        let sizes_v2 = inputs::oci_layer_sizes(&images[1])?;
        let changed_layer = sizes_v2
            .iter()
            .zip(&sizes_v1)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| *a)
            .sum();
        let v2 = images.pop().context("two images")?;
        let v1 = images.pop().context("two images")?;
        Ok(Versions {
            v1,
            v2,
            changed_layer,
        })
    }
}

fn skopeo_push(image: &OciImage, reference: &str) -> anyhow::Result<()> {
    tools::output(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(image.skopeo_ref())
            .arg(format!("docker://{reference}")),
    )
    .map(drop)
}

/// What `darter build` says it uploaded.
#[derive(Debug, Clone, Copy)]
struct Sent {
    bytes: u64,
    /// The new bootstrap and the new blobs' chunk tables and trailers.
    metadata: u64,
}

/// `darter build SOURCE -o TARGET [--parent PARENT] --json`.
fn darter_build(
    bench: &Bench,
    source: &str,
    target: &str,
    parent: Option<&str>,
) -> anyhow::Result<Sent> {
    let mut args = vec!["--plain-http", "build", source, "-o", target, "--json"];
    if let Some(parent) = parent {
        args.extend(["--parent", parent]);
    }
    let report = bench.darter.json(args)?;
    let field = |name: &str| {
        report[name]
            .as_u64()
            .with_context(|| format!("the build report has no {name}"))
    };
    let stored = report["chunks"]["stored_bytes"]
        .as_u64()
        .context("the build report has no chunks.stored_bytes")?;
    Ok(Sent {
        bytes: field("sent_bytes")?,
        metadata: field("bootstrap_bytes")? + field("new_blob_bytes")?.saturating_sub(stored),
    })
}

struct Step {
    what: String,
    seconds: f64,
    growth: u64,
    reported: Option<Sent>,
}

fn report(versions: &Versions, steps: &[Step]) -> ScenarioReport {
    let mut table = Table::new(
        "Each push, in order, against one registry",
        &[
            "step",
            "wall time",
            "registry storage growth",
            "the tool says it sent",
        ],
    );
    for s in steps {
        table.row(vec![
            s.what.clone(),
            Unit::Seconds.show(s.seconds),
            Unit::Bytes.show(s.growth as f64),
            s.reported
                .map_or_else(|| "-".to_owned(), |r| Unit::Bytes.show(r.bytes as f64)),
        ]);
    }
    let oci = steps[1].growth;
    let darter = steps[3].growth;
    let metadata = steps[3].reported.map_or(0, |r| r.metadata);
    let limit = CHANGED_BYTES + metadata + MANIFEST_SLACK;
    let aims = vec![
        Aim::new(
            "issue 4",
            "after one 10 MiB file changes, the --parent push uploads at most that file's \
             stored chunks plus the new bootstrap and chunk table",
            format!(
                "{} grew the registry; bound {} (10 MiB of incompressible chunks + {} of \
                 bootstrap and chunk table + 64 KiB for manifests)",
                Unit::Bytes.show(darter as f64),
                Unit::Bytes.show(limit as f64),
                Unit::Bytes.show(metadata as f64)
            ),
            Verdict::at_most(darter as f64, limit as f64),
        ),
        Aim::new(
            "issue 5",
            "the Darter update uploads less than re-pushing the changed OCI layer",
            format!(
                "{} vs {} ({:.2}x)",
                Unit::Bytes.show(darter as f64),
                Unit::Bytes.show(oci as f64),
                darter as f64 / oci.max(1) as f64
            ),
            Verdict::at_most(darter as f64, oci as f64),
        ),
    ];
    let mut out = ScenarioReport::new(Push.name(), Push.title());
    out.method = vec![format!(
        "Two versions of the Debian python3 image with a 10 MiB file of random bytes at \
             `/{CHANGED_FILE}` whose content differs between them, each a plain OCI image made \
             by umoci with two gzip layers (minbase; python3 and the file). A local registry \
             (Debian `docker-registry`) receives, in order: both OCI images (`skopeo copy`, \
             which skips blobs the registry has: version 2 uploads its changed {} layer), then \
             `darter build` of version 1 from the registry into the registry, then of version \
             2 with `--parent` the Darter version 1. Bytes uploaded are the growth of the \
             registry's storage directory; the sizes do not vary between runs, so this runs \
             once.",
        Unit::Bytes.show(versions.changed_layer as f64)
    )];
    out.tables = vec![table];
    out.charts = vec![Chart {
        file: "push.png".into(),
        title: "Bytes uploaded for a 10 MiB change".into(),
        kind: ChartKind::Bars {
            value_label: "MB uploaded".into(),
            bars: vec![
                Bar {
                    label: "re-push of the changed OCI layer".into(),
                    value: oci as f64 / 1e6,
                    darter: false,
                },
                Bar {
                    label: "darter build --parent".into(),
                    value: darter as f64 / 1e6,
                    darter: true,
                },
            ],
            reference: None,
        },
    }];
    out.aims = aims;
    out
}
