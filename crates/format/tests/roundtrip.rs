//! Round trip: a tree written as a bootstrap reads back identically.

#![allow(clippy::unwrap_used)]

use darter_format::blob::{BLOCK_BITS, BlobWriter, DEFAULT_CHUNK_SIZE, FramePacker};
use darter_format::bootstrap::{BlobEntry, Bootstrap, BootstrapInfo, write_bootstrap};
use darter_format::compress::{Compression, Compressor};
use darter_format::erofs::ondisk::{ChunkIndex, file_type};
use darter_format::erofs::{Erofs, Inode};
use darter_format::tree::{Entry, FileData, Meta, Node, NodeKind, Tree};
use darter_format::{DigestAlgo, ReadAt};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

fn meta(perm: u16) -> Meta {
    Meta {
        perm,
        uid: 1000,
        gid: 100,
        mtime: 1_700_000_000,
        mtime_nsec: 5,
        xattrs: vec![],
    }
}

fn node(kind: NodeKind, perm: u16) -> Node {
    Node {
        meta: meta(perm),
        kind,
    }
}

/// Reads the tree back from an image into the same shape as the input,
/// so the two can be compared with `==`.
fn read_tree<R: ReadAt>(img: &Erofs<R>) -> Tree {
    let mut tree = Tree::default();
    let root = img.inode(img.root_nid()).unwrap();
    let mut by_nid = HashMap::new();
    read_node(img, &root, &mut tree, &mut by_nid);
    tree
}

fn read_node<R: ReadAt>(
    img: &Erofs<R>,
    inode: &Inode,
    tree: &mut Tree,
    by_nid: &mut HashMap<u64, u32>,
) -> u32 {
    if let Some(&id) = by_nid.get(&inode.nid) {
        return id;
    }
    let id = tree.nodes.len() as u32;
    by_nid.insert(inode.nid, id);
    let m = Meta {
        perm: inode.mode & 0o7777,
        uid: inode.uid,
        gid: inode.gid,
        mtime: inode.mtime,
        mtime_nsec: inode.mtime_nsec,
        xattrs: img.xattrs(inode).unwrap(),
    };
    tree.nodes.push(node(NodeKind::Fifo, 0));
    let kind = match inode.mode & 0o170000 {
        0o040000 => {
            let mut entries = Vec::new();
            for e in img.dir_entries(inode).unwrap() {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let child = img.inode(e.nid).unwrap();
                let child_id = read_node(img, &child, tree, by_nid);
                entries.push(Entry {
                    name: e.name,
                    node: child_id,
                });
            }
            NodeKind::Dir(entries)
        }
        0o100000 => {
            let chunks = (0..inode.chunk_count(BLOCK_BITS))
                .map(|i| img.chunk_index(inode, i).unwrap())
                .collect::<Vec<_>>();
            let chunks = if inode.size == 0 { vec![] } else { chunks };
            NodeKind::File(FileData {
                size: inode.size,
                chunks,
            })
        }
        0o120000 => NodeKind::Symlink(img.symlink_target(inode).unwrap()),
        0o020000 => NodeKind::CharDev(inode.rdev().0, inode.rdev().1),
        0o060000 => NodeKind::BlockDev(inode.rdev().0, inode.rdev().1),
        0o010000 => NodeKind::Fifo,
        0o140000 => NodeKind::Socket,
        other => panic!("unexpected mode {other:o}"),
    };
    tree.nodes[id as usize] = Node { meta: m, kind };
    id
}

/// A node described without node ids: directories by their entry names,
/// everything else by its content; hardlinks by the first path reaching them.
#[derive(Debug, PartialEq, Eq)]
struct FlatNode {
    meta: Meta,
    kind: String,
    link_group: Vec<u8>,
}

/// Flattens a tree into path -> node, so trees with different node
/// numbering compare equal when they describe the same filesystem.
fn flatten(tree: &Tree) -> BTreeMap<Vec<u8>, FlatNode> {
    let mut out = BTreeMap::new();
    let mut first_path: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut stack = vec![(b"/".to_vec(), 0u32)];
    while let Some((path, id)) = stack.pop() {
        let node = &tree.nodes[id as usize];
        let mut meta = node.meta.clone();
        meta.xattrs.sort();
        let group = first_path.entry(id).or_insert_with(|| path.clone()).clone();
        let kind = match &node.kind {
            NodeKind::Dir(entries) => {
                let mut names: Vec<_> = entries.iter().map(|e| e.name.clone()).collect();
                names.sort();
                let mut sorted: Vec<_> = entries.iter().collect();
                sorted.sort_by(|a, b| a.name.cmp(&b.name));
                for e in sorted {
                    let mut child = path.clone();
                    child.push(b'/');
                    child.extend_from_slice(&e.name);
                    stack.push((child, e.node));
                }
                format!("dir {names:?}")
            }
            other => format!("{other:?}"),
        };
        out.insert(
            path,
            FlatNode {
                meta,
                kind,
                link_group: group,
            },
        );
    }
    out
}

fn assert_same_tree(actual: &Tree, expected: &Tree) {
    let (a, e) = (flatten(actual), flatten(expected));
    for (path, want) in &e {
        let p = String::from_utf8_lossy(path);
        let got = a.get(path).unwrap_or_else(|| panic!("{p} missing"));
        assert_eq!(got, want, "{p} differs");
    }
    assert_eq!(a.len(), e.len(), "extra paths in the read-back tree");
}

fn sample_tree() -> Tree {
    let chunk = |blk| ChunkIndex {
        device_id: 1,
        blkaddr: blk,
    };
    let big_dir: Vec<Entry> = (0..2000)
        .map(|i| Entry {
            name: format!("f{i:06}").into_bytes(),
            node: 2,
        })
        .collect();
    let mut xmeta = meta(0o4755);
    xmeta.xattrs = vec![
        (
            b"security.capability".to_vec(),
            vec![
                1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        (b"user.empty".to_vec(), vec![]),
        (b"user.k".to_vec(), b"v".to_vec()),
    ];
    Tree {
        nodes: vec![
            node(
                NodeKind::Dir(vec![
                    Entry {
                        name: b"dir".to_vec(),
                        node: 1,
                    },
                    Entry {
                        name: b"file".to_vec(),
                        node: 2,
                    },
                    Entry {
                        name: b"link".to_vec(),
                        node: 3,
                    },
                    Entry {
                        name: b"hard".to_vec(),
                        node: 2,
                    },
                    Entry {
                        name: b"\xff\nodd name".to_vec(),
                        node: 4,
                    },
                    Entry {
                        name: b"sparse".to_vec(),
                        node: 5,
                    },
                    Entry {
                        name: b"null".to_vec(),
                        node: 6,
                    },
                    Entry {
                        name: b"long-link".to_vec(),
                        node: 7,
                    },
                    Entry {
                        name: vec![b'x'; 255],
                        node: 8,
                    },
                    Entry {
                        name: b"-dash".to_vec(),
                        node: 9,
                    },
                ]),
                0o755,
            ),
            node(NodeKind::Dir(big_dir), 0o1777),
            Node {
                meta: xmeta,
                kind: NodeKind::File(FileData {
                    size: 5000,
                    chunks: vec![chunk(0)],
                }),
            },
            node(NodeKind::Symlink(b"../target".to_vec()), 0o777),
            node(NodeKind::Fifo, 0o600),
            node(
                NodeKind::File(FileData {
                    size: 3 * u64::from(DEFAULT_CHUNK_SIZE) + 1,
                    chunks: vec![ChunkIndex::HOLE, chunk(2), ChunkIndex::HOLE, chunk(3)],
                }),
                0o644,
            ),
            node(NodeKind::CharDev(1, 3), 0o666),
            node(NodeKind::Symlink(vec![b'a'; 4000]), 0o777),
            node(NodeKind::File(FileData::default()), 0),
            node(NodeKind::BlockDev(259, 70000), 0o660),
        ],
    }
}

fn one_blob() -> (Vec<u8>, BlobEntry) {
    let mut packer = FramePacker::new(64 << 10);
    let mut writer = BlobWriter::new(Vec::new(), DigestAlgo::Blake3, DEFAULT_CHUNK_SIZE);
    let mut c = Compressor::new(Compression::Zstd, 3).unwrap();
    let mut frames = Vec::new();
    for data in [vec![1u8; 5000], vec![2u8; 10], vec![3u8; 70_000]] {
        frames.extend(
            packer
                .push(&data, *DigestAlgo::Blake3.digest(&data).bytes())
                .unwrap()
                .1,
        );
    }
    let (last, size) = packer.finish();
    frames.extend(last);
    for f in &frames {
        let (kind, stored) = c.compress(&f.data).unwrap();
        writer.write_frame(f, kind, &stored).unwrap();
    }
    let (bytes, summary) = writer.finish(size).unwrap();
    let sha = *DigestAlgo::Sha256.digest(&bytes).bytes();
    (bytes, BlobEntry::new(sha, &summary))
}

fn info(blobs: Vec<BlobEntry>) -> BootstrapInfo {
    BootstrapInfo {
        digest_algo: DigestAlgo::Blake3,
        chunk_size_bits: 20,
        blobs,
    }
}

#[test]
fn sample_tree_round_trips() {
    let (blob, entry) = one_blob();
    let tree = sample_tree();
    let bytes = write_bootstrap(&tree, &info(vec![entry]), 0).unwrap();
    let bs = Bootstrap::open(&bytes[..]).unwrap();
    assert_eq!(bs.info(), &info(vec![entry]));
    assert_same_tree(&read_tree(bs.erofs()), &tree);
    // The blob's tail maps with the bootstrap's record alone.
    let tail = &blob[entry.tail_range().start as usize..];
    assert_eq!(entry.decode_tail(tail).unwrap().records().len(), 3);
    // Lookups by binary search find every entry of a multi-block directory.
    let root = bs.erofs().inode(bs.erofs().root_nid()).unwrap();
    let dir = bs.erofs().lookup(&root, b"dir").unwrap().unwrap();
    let dir = bs.erofs().inode(dir.nid).unwrap();
    assert!(bs.erofs().dir_block_count(&dir) > 5);
    for i in (0..2000).step_by(97) {
        let e = bs
            .erofs()
            .lookup(&dir, format!("f{i:06}").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(e.file_type, file_type::REG);
    }
    assert!(bs.erofs().lookup(&dir, b"f999999").unwrap().is_none());
    assert!(bs.erofs().lookup(&dir, b"a").unwrap().is_none());
}

#[test]
fn writing_is_deterministic() {
    let (_, entry) = one_blob();
    let a = write_bootstrap(&sample_tree(), &info(vec![entry]), 0).unwrap();
    let b = write_bootstrap(&sample_tree(), &info(vec![entry]), 0).unwrap();
    assert_eq!(a, b);
}

#[test]
fn invalid_trees_are_rejected() {
    let cases: Vec<(&str, Tree)> = vec![
        (
            "slash in name",
            Tree {
                nodes: vec![
                    node(
                        NodeKind::Dir(vec![Entry {
                            name: b"a/b".to_vec(),
                            node: 1,
                        }]),
                        0,
                    ),
                    node(NodeKind::Fifo, 0),
                ],
            },
        ),
        (
            "dot name",
            Tree {
                nodes: vec![
                    node(
                        NodeKind::Dir(vec![Entry {
                            name: b"..".to_vec(),
                            node: 1,
                        }]),
                        0,
                    ),
                    node(NodeKind::Fifo, 0),
                ],
            },
        ),
        (
            "duplicate",
            Tree {
                nodes: vec![
                    node(
                        NodeKind::Dir(vec![
                            Entry {
                                name: b"a".to_vec(),
                                node: 1,
                            },
                            Entry {
                                name: b"a".to_vec(),
                                node: 1,
                            },
                        ]),
                        0,
                    ),
                    node(NodeKind::Fifo, 0),
                ],
            },
        ),
        (
            "dir hardlink",
            Tree {
                nodes: vec![
                    node(
                        NodeKind::Dir(vec![
                            Entry {
                                name: b"a".to_vec(),
                                node: 1,
                            },
                            Entry {
                                name: b"b".to_vec(),
                                node: 1,
                            },
                        ]),
                        0,
                    ),
                    node(NodeKind::Dir(vec![]), 0),
                ],
            },
        ),
        (
            "root loop",
            Tree {
                nodes: vec![node(
                    NodeKind::Dir(vec![Entry {
                        name: b"a".to_vec(),
                        node: 0,
                    }]),
                    0,
                )],
            },
        ),
        (
            "missing node",
            Tree {
                nodes: vec![node(
                    NodeKind::Dir(vec![Entry {
                        name: b"a".to_vec(),
                        node: 9,
                    }]),
                    0,
                )],
            },
        ),
        (
            "chunk count",
            Tree {
                nodes: vec![
                    node(
                        NodeKind::Dir(vec![Entry {
                            name: b"a".to_vec(),
                            node: 1,
                        }]),
                        0,
                    ),
                    node(
                        NodeKind::File(FileData {
                            size: 10,
                            chunks: vec![],
                        }),
                        0,
                    ),
                ],
            },
        ),
        (
            "root not dir",
            Tree {
                nodes: vec![node(NodeKind::Fifo, 0)],
            },
        ),
    ];
    for (what, tree) in cases {
        assert!(
            write_bootstrap(&tree, &info(vec![]), 0).is_err(),
            "{what} was accepted"
        );
    }
}

/// Flipping any byte of a bootstrap never panics the reader: it either
/// reports an error or reads some tree.
#[test]
fn corrupted_bootstraps_never_panic() {
    let (_, entry) = one_blob();
    let bytes = write_bootstrap(&sample_tree(), &info(vec![entry]), 0).unwrap();
    for pos in (0..bytes.len()).step_by(7) {
        let mut bad = bytes.clone();
        bad[pos] ^= 0xa5;
        if let Ok(bs) = Bootstrap::open(&bad[..]) {
            let _ = bs.erofs().walk(&mut |_, _, inode| {
                let _ = bs.erofs().xattrs(inode);
                Ok(())
            });
        }
    }
    for len in [0, 10, 1024, 1100, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            Bootstrap::open(&bytes[..len]).is_err(),
            "truncated to {len} accepted"
        );
    }
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(1u8..=255, 1..40)
        .prop_filter("valid", |n| darter_format::tree::is_valid_name(n))
}

fn arb_tree() -> impl Strategy<Value = Tree> {
    // A root with up to 3 subdirectories, files and symlinks with random
    // names, metadata and xattrs.
    let leaf = (
        arb_name(),
        0u16..0o7777,
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        0u32..1_000_000_000,
        0u64..5_000_000,
        proptest::collection::vec(
            (
                proptest::collection::vec(b'a'..=b'z', 1..10),
                proptest::collection::vec(any::<u8>(), 0..50),
            ),
            0..3,
        ),
    );
    proptest::collection::vec((0usize..4, leaf), 0..60).prop_map(|leaves| {
        let mut nodes = vec![node(NodeKind::Dir(vec![]), 0o755)];
        for d in 0..3 {
            nodes.push(node(NodeKind::Dir(vec![]), 0o700));
            if let NodeKind::Dir(e) = &mut nodes[0].kind {
                e.push(Entry {
                    name: format!("d{d}").into_bytes(),
                    node: d + 1,
                });
            }
        }
        for (dir, (name, perm, uid, gid, mtime, nsec, size, xattrs)) in leaves {
            let id = nodes.len() as u32;
            let chunks = (0..size.div_ceil(1 << 20))
                .map(|i| ChunkIndex {
                    device_id: 1,
                    blkaddr: i as u32,
                })
                .collect();
            let kind = if size % 3 == 0 {
                NodeKind::Symlink(name.clone())
            } else {
                NodeKind::File(FileData { size, chunks })
            };
            let mut xa: Vec<_> = xattrs
                .into_iter()
                .map(|(k, v)| ([b"user.".to_vec(), k].concat(), v))
                .collect();
            xa.sort();
            xa.dedup_by(|a, b| a.0 == b.0);
            nodes.push(Node {
                meta: Meta {
                    perm,
                    uid,
                    gid,
                    mtime,
                    mtime_nsec: nsec,
                    xattrs: xa,
                },
                kind,
            });
            if let NodeKind::Dir(e) = &mut nodes[dir].kind
                && !e.iter().any(|x| x.name == name)
            {
                e.push(Entry { name, node: id });
            }
        }
        Tree { nodes }
    })
}

fn fake_blob() -> BlobEntry {
    one_blob().1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_trees_round_trip(tree in arb_tree()) {
        let bytes = write_bootstrap(&tree, &info(vec![fake_blob()]), 0).unwrap();
        let bs = Bootstrap::open(&bytes[..]).unwrap();
        assert_same_tree(&read_tree(bs.erofs()), &tree);
    }
}
