//! The tree being built: paths, layers and OCI merge semantics
//! (whiteouts, opaque directories, replacement, hardlinks), with
//! symlinks in parent paths resolved inside the image root, never outside.

use std::collections::BTreeMap;

use darter_format::tree::{Entry, FileData, Meta, Node, NodeId, NodeKind, Tree};

/// A symlink chain longer than this in a parent path is an error (as ELOOP).
const MAX_SYMLINK_HOPS: usize = 40;

/// Why an entry cannot be applied to the tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    /// A path component is `..` or too long.
    #[error("path {path:?} {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A parent of the path exists but is not a directory.
    #[error("path {path:?}: parent {parent:?} is not a directory")]
    NotADirectory {
        /// The path.
        path: String,
        /// The offending component.
        parent: String,
    },
    /// A parent of the path does not exist (and may not be created).
    #[error("path {path:?}: {missing:?} does not exist")]
    NotFound {
        /// The path.
        path: String,
        /// The missing component.
        missing: String,
    },
    /// Too many symlinks while resolving a parent path.
    #[error("path {path:?}: too many levels of symbolic links")]
    SymlinkLoop {
        /// The path.
        path: String,
    },
    /// A hardlink names a directory or something missing.
    #[error("hardlink {path:?} -> {target:?}: {reason}")]
    BadHardlink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
        /// What is wrong.
        reason: &'static str,
    },
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Splits an archive path into components: leading `/` and `./` and empty
/// or `.` components are dropped; `..` is refused, since a layer entry
/// must not climb out of the root.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, MergeError> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(MergeError::BadPath {
                    path: lossy(path),
                    reason: "contains '..'",
                });
            }
            c if c.len() > darter_format::erofs::ondisk::NAME_LEN => {
                return Err(MergeError::BadPath {
                    path: lossy(path),
                    reason: "has a component longer than 255 bytes",
                });
            }
            c if c.contains(&0) => {
                return Err(MergeError::BadPath {
                    path: lossy(path),
                    reason: "contains NUL",
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Kind {
    Dir(BTreeMap<Vec<u8>, NodeId>),
    Leaf(NodeKind),
}

#[derive(Debug, Clone)]
struct MNode {
    meta: Meta,
    kind: Kind,
    /// The last layer that declared this node or anything below it.
    touched: u32,
}

/// A mutable tree with OCI layer semantics.
#[derive(Debug)]
pub struct MergeTree {
    nodes: Vec<MNode>,
    layer: u32,
    opaque: Vec<NodeId>,
}

impl Default for MergeTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MergeTree {
    /// A tree holding only a root directory (mode 0755, root-owned).
    pub fn new() -> Self {
        MergeTree {
            nodes: vec![MNode {
                meta: implicit_dir_meta(),
                kind: Kind::Dir(BTreeMap::new()),
                touched: 0,
            }],
            layer: 0,
            opaque: Vec::new(),
        }
    }

    /// Starts applying layer `layer` (layers count up from 1).
    pub fn begin_layer(&mut self, layer: u32) {
        self.layer = layer;
    }

    /// Sets the metadata of the root directory.
    pub fn set_root_meta(&mut self, meta: Meta) {
        self.nodes[0].meta = meta;
        self.nodes[0].touched = self.layer;
    }

    /// Puts a node at `path`: a directory over a directory keeps the
    /// children and takes the new metadata; anything else replaces what
    /// was there. Missing parents are created as 0755 root-owned dirs.
    pub fn put(&mut self, path: &[u8], meta: Meta, kind: NodeKind) -> Result<NodeId, MergeError> {
        let (parent, name) = self.parent_of(path)?;
        let existing = self.child(parent, name);
        if let (Some(id), NodeKind::Dir(_)) = (existing, &kind)
            && matches!(self.nodes[id as usize].kind, Kind::Dir(_))
        {
            self.nodes[id as usize].meta = meta;
            self.touch(id);
            return Ok(id);
        }
        let kind = match kind {
            NodeKind::Dir(_) => Kind::Dir(BTreeMap::new()),
            other => Kind::Leaf(other),
        };
        let id = self.nodes.len() as NodeId;
        self.nodes.push(MNode {
            meta,
            kind,
            touched: self.layer,
        });
        self.set_child(parent, name, id);
        Ok(id)
    }

    /// Makes `path` another name of the node at `target`.
    pub fn link(&mut self, path: &[u8], target: &[u8]) -> Result<(), MergeError> {
        let bad = |reason| MergeError::BadHardlink {
            path: lossy(path),
            target: lossy(target),
            reason,
        };
        let (tparent, tname) = self
            .parent_of_existing(target)
            .map_err(|_| bad("target does not exist"))?;
        let id = self
            .child(tparent, tname)
            .ok_or_else(|| bad("target does not exist"))?;
        if matches!(self.nodes[id as usize].kind, Kind::Dir(_)) {
            return Err(bad("target is a directory"));
        }
        let (parent, name) = self.parent_of(path)?;
        if self.child(parent, name) == Some(id) {
            return Ok(());
        }
        self.set_child(parent, name, id);
        self.touch(id);
        Ok(())
    }

    /// Applies a whiteout `.wh.NAME` found in directory `dir`: removes NAME
    /// if it came from a lower layer.
    pub fn whiteout(&mut self, dir: &[u8], name: &[u8]) -> Result<(), MergeError> {
        let Ok(dir_id) = self.resolve_dir(dir, false) else {
            return Ok(());
        };
        if let Some(child) = self.child(dir_id, name)
            && self.nodes[child as usize].touched < self.layer
            && let Kind::Dir(children) = &mut self.nodes[dir_id as usize].kind
        {
            children.remove(name);
        }
        Ok(())
    }

    /// Marks directory `dir` opaque for the current layer: at the end of
    /// the layer, everything below it from lower layers is removed.
    pub fn opaque(&mut self, dir: &[u8]) -> Result<(), MergeError> {
        let id = self.resolve_dir(dir, true)?;
        self.touch(id);
        self.opaque.push(id);
        Ok(())
    }

    /// Finishes the current layer (applies opaque markers).
    pub fn end_layer(&mut self) {
        for dir in std::mem::take(&mut self.opaque) {
            self.hide_lower(dir);
        }
    }

    /// The node at `path`, if present (parents resolved inside the root).
    pub fn lookup(&self, path: &[u8]) -> Option<NodeId> {
        let (parent, name) = self.parent_of_existing(path).ok()?;
        if name.is_empty() {
            Some(0)
        } else {
            self.child(parent, name)
        }
    }

    /// Replaces the content of a regular file node (used once its data is chunked).
    pub fn set_file_data(&mut self, id: NodeId, data: FileData) {
        if let Kind::Leaf(NodeKind::File(f)) = &mut self.nodes[id as usize].kind {
            *f = data;
        }
    }

    /// Calls `f` on the data of every reachable regular file.
    pub fn for_each_file(&mut self, mut f: impl FnMut(&mut FileData)) {
        for id in self.reachable() {
            if let Kind::Leaf(NodeKind::File(data)) = &mut self.nodes[id as usize].kind {
                f(data);
            }
        }
    }

    /// The final tree: reachable nodes only, renumbered with the root at 0.
    pub fn into_tree(self) -> Tree {
        let order = self.reachable();
        let mut new_id = vec![u32::MAX; self.nodes.len()];
        for (i, &old) in order.iter().enumerate() {
            new_id[old as usize] = i as u32;
        }
        let nodes = order
            .iter()
            .map(|&old| {
                let n = &self.nodes[old as usize];
                let kind = match &n.kind {
                    Kind::Dir(children) => NodeKind::Dir(
                        children
                            .iter()
                            .map(|(name, &c)| Entry {
                                name: name.clone(),
                                node: new_id[c as usize],
                            })
                            .collect(),
                    ),
                    Kind::Leaf(k) => k.clone(),
                };
                Node {
                    meta: n.meta.clone(),
                    kind,
                }
            })
            .collect();
        Tree { nodes }
    }

    fn reachable(&self) -> Vec<NodeId> {
        let mut seen = vec![false; self.nodes.len()];
        let mut order = vec![0];
        seen[0] = true;
        let mut i = 0;
        while i < order.len() {
            if let Kind::Dir(children) = &self.nodes[order[i] as usize].kind {
                for &c in children.values() {
                    if !std::mem::replace(&mut seen[c as usize], true) {
                        order.push(c);
                    }
                }
            }
            i += 1;
        }
        order
    }

    fn hide_lower(&mut self, dir: NodeId) {
        let layer = self.layer;
        let Kind::Dir(children) = &self.nodes[dir as usize].kind else {
            return;
        };
        let (keep, drop): (Vec<_>, Vec<_>) = children
            .iter()
            .map(|(n, &c)| (n.clone(), c))
            .partition(|(_, c)| self.nodes[*c as usize].touched >= layer);
        if let Kind::Dir(children) = &mut self.nodes[dir as usize].kind {
            for (name, _) in drop {
                children.remove(&name);
            }
        }
        for (_, c) in keep {
            if matches!(self.nodes[c as usize].kind, Kind::Dir(_)) {
                self.hide_lower(c);
            }
        }
    }

    fn touch(&mut self, id: NodeId) {
        self.nodes[id as usize].touched = self.layer;
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.nodes[dir as usize].kind {
            Kind::Dir(children) => children.get(name).copied(),
            Kind::Leaf(_) => None,
        }
    }

    fn set_child(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        if let Kind::Dir(children) = &mut self.nodes[dir as usize].kind {
            children.insert(name.to_vec(), id);
        }
    }

    /// The parent directory of `path` (created as needed, and marked as
    /// touched by this layer) and the final name. The root itself is
    /// `(0, b"")`.
    fn parent_of<'p>(&mut self, path: &'p [u8]) -> Result<(NodeId, &'p [u8]), MergeError> {
        let comps = split_path(path)?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(MergeError::BadPath {
                path: lossy(path),
                reason: "names the root",
            });
        };
        let parent = self.walk(path, parents, true)?;
        Ok((parent, name))
    }

    fn parent_of_existing<'p>(&self, path: &'p [u8]) -> Result<(NodeId, &'p [u8]), MergeError> {
        let comps = split_path(path)?;
        match comps.split_last() {
            None => Ok((0, b"")),
            Some((name, parents)) => Ok((self.walk_existing(path, parents)?, name)),
        }
    }

    fn resolve_dir(&mut self, path: &[u8], create: bool) -> Result<NodeId, MergeError> {
        let comps = split_path(path)?;
        if create {
            self.walk(path, &comps, true)
        } else {
            self.walk_existing(path, &comps)
        }
    }

    fn walk_existing(&self, path: &[u8], comps: &[&[u8]]) -> Result<NodeId, MergeError> {
        let mut resolver = Resolver::new(path, comps);
        while let Some(step) = resolver.next(self)? {
            match step {
                Step::Missing(name) => {
                    return Err(MergeError::NotFound {
                        path: lossy(path),
                        missing: lossy(&name),
                    });
                }
                Step::Dir(_) => {}
            }
        }
        Ok(resolver.current())
    }

    fn walk(&mut self, path: &[u8], comps: &[&[u8]], create: bool) -> Result<NodeId, MergeError> {
        let mut resolver = Resolver::new(path, comps);
        while let Some(step) = resolver.next(self)? {
            match step {
                Step::Missing(name) if create => {
                    let parent = resolver.current();
                    let id = self.nodes.len() as NodeId;
                    self.nodes.push(MNode {
                        meta: implicit_dir_meta(),
                        kind: Kind::Dir(BTreeMap::new()),
                        touched: self.layer,
                    });
                    self.set_child(parent, &name, id);
                    resolver.enter(id);
                }
                Step::Missing(name) => {
                    return Err(MergeError::NotFound {
                        path: lossy(path),
                        missing: lossy(&name),
                    });
                }
                Step::Dir(id) => self.nodes[id as usize].touched = self.layer,
            }
        }
        Ok(resolver.current())
    }
}

enum Step {
    /// Entered an existing directory.
    Dir(NodeId),
    /// The next component does not exist; the caller creates it or fails.
    Missing(Vec<u8>),
}

/// Resolves parent components one at a time, following symlinks as if the
/// tree's root were `/` (so `..` and absolute targets stay inside).
struct Resolver {
    path: Vec<u8>,
    stack: Vec<NodeId>,
    pending: std::collections::VecDeque<Vec<u8>>,
    hops: usize,
}

impl Resolver {
    fn new(path: &[u8], comps: &[&[u8]]) -> Self {
        Resolver {
            path: path.to_vec(),
            stack: vec![0],
            pending: comps.iter().map(|c| c.to_vec()).collect(),
            hops: 0,
        }
    }

    fn current(&self) -> NodeId {
        *self.stack.last().unwrap_or(&0)
    }

    fn enter(&mut self, id: NodeId) {
        self.stack.push(id);
    }

    fn next(&mut self, tree: &MergeTree) -> Result<Option<Step>, MergeError> {
        loop {
            let Some(c) = self.pending.pop_front() else {
                return Ok(None);
            };
            match &c[..] {
                b"" | b"." => continue,
                b".." => {
                    if self.stack.len() > 1 {
                        self.stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let Some(id) = tree.child(self.current(), &c) else {
                return Ok(Some(Step::Missing(c)));
            };
            match &tree.nodes[id as usize].kind {
                Kind::Dir(_) => {
                    self.stack.push(id);
                    return Ok(Some(Step::Dir(id)));
                }
                Kind::Leaf(NodeKind::Symlink(target)) => {
                    self.hops += 1;
                    if self.hops > MAX_SYMLINK_HOPS {
                        return Err(MergeError::SymlinkLoop {
                            path: lossy(&self.path),
                        });
                    }
                    if target.starts_with(b"/") {
                        self.stack.truncate(1);
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        self.pending.push_front(part.to_vec());
                    }
                }
                Kind::Leaf(_) => {
                    return Err(MergeError::NotADirectory {
                        path: lossy(&self.path),
                        parent: lossy(&c),
                    });
                }
            }
        }
    }
}

fn implicit_dir_meta() -> Meta {
    Meta {
        perm: 0o755,
        ..Meta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> NodeKind {
        NodeKind::File(FileData {
            size,
            chunks: vec![],
        })
    }

    fn meta(perm: u16) -> Meta {
        Meta {
            perm,
            ..Meta::default()
        }
    }

    fn paths(t: &MergeTree) -> Vec<String> {
        let tree = t.clone_tree();
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), 0u32)];
        while let Some((p, id)) = stack.pop() {
            if let NodeKind::Dir(es) = &tree.nodes[id as usize].kind {
                for e in es {
                    let child = format!("{p}/{}", String::from_utf8_lossy(&e.name));
                    out.push(child.clone());
                    stack.push((child, e.node));
                }
            }
        }
        out.sort();
        out
    }

    impl MergeTree {
        fn clone_tree(&self) -> Tree {
            MergeTree {
                nodes: self.nodes.clone(),
                layer: self.layer,
                opaque: vec![],
            }
            .into_tree()
        }
    }

    #[test]
    fn split_path_table() {
        let ok: [(&[u8], Vec<&[u8]>); 4] = [
            (b"./a/b", vec![b"a", b"b"]),
            (b"/etc//passwd", vec![b"etc", b"passwd"]),
            (b"a/./b/", vec![b"a", b"b"]),
            (b"./", vec![]),
        ];
        for (p, want) in ok {
            assert_eq!(split_path(p).unwrap(), want);
        }
        for bad in [&b"../x"[..], b"a/../../x", b"a/.."] {
            assert!(split_path(bad).is_err());
        }
    }

    #[test]
    fn whiteouts_and_opaque_follow_oci_rules() {
        let mut t = MergeTree::new();
        t.begin_layer(1);
        t.put(b"a/x", meta(0o644), file(1)).unwrap();
        t.put(b"a/y", meta(0o644), file(1)).unwrap();
        t.put(b"b/z", meta(0o644), file(1)).unwrap();
        t.put(b"c/sub/deep", meta(0o644), file(1)).unwrap();
        t.end_layer();
        t.begin_layer(2);
        t.whiteout(b"a", b"x").unwrap();
        t.put(b"b/new", meta(0o644), file(1)).unwrap();
        t.opaque(b"b").unwrap();
        t.put(b"c/sub/fresh", meta(0o644), file(1)).unwrap();
        t.opaque(b"c").unwrap();
        // A whiteout of something this same layer added does nothing.
        t.put(b"d", meta(0o644), file(1)).unwrap();
        t.whiteout(b"", b"d").unwrap();
        t.end_layer();
        assert_eq!(
            paths(&t),
            [
                "/a",
                "/a/y",
                "/b",
                "/b/new",
                "/c",
                "/c/sub",
                "/c/sub/fresh",
                "/d"
            ]
        );
    }

    #[test]
    fn replacement_between_file_and_dir() {
        let mut t = MergeTree::new();
        t.begin_layer(1);
        t.put(b"p/child", meta(0o644), file(1)).unwrap();
        t.begin_layer(2);
        t.put(b"p", meta(0o600), file(5)).unwrap();
        assert_eq!(paths(&t), ["/p"]);
        t.begin_layer(3);
        t.put(b"p", meta(0o700), NodeKind::Dir(vec![])).unwrap();
        t.put(b"p/again", meta(0o644), file(1)).unwrap();
        assert_eq!(paths(&t), ["/p", "/p/again"]);
        // A dir over a dir keeps the children and takes the metadata.
        t.put(b"p", meta(0o711), NodeKind::Dir(vec![])).unwrap();
        let tree = t.clone_tree();
        assert_eq!(tree.nodes[1].meta.perm, 0o711);
        assert_eq!(paths(&t), ["/p", "/p/again"]);
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_root() {
        let mut t = MergeTree::new();
        t.begin_layer(1);
        t.put(b"real", meta(0o755), NodeKind::Dir(vec![])).unwrap();
        t.put(b"abs", meta(0o777), NodeKind::Symlink(b"/real".to_vec()))
            .unwrap();
        t.put(
            b"escape",
            meta(0o777),
            NodeKind::Symlink(b"../../../../real".to_vec()),
        )
        .unwrap();
        t.put(b"abs/one", meta(0o644), file(1)).unwrap();
        t.put(b"escape/two", meta(0o644), file(1)).unwrap();
        t.put(b"loop", meta(0o777), NodeKind::Symlink(b"loop".to_vec()))
            .unwrap();
        assert!(matches!(
            t.put(b"loop/x", meta(0), file(1)),
            Err(MergeError::SymlinkLoop { .. })
        ));
        assert!(matches!(
            t.put(b"real/one/x", meta(0), file(1)),
            Err(MergeError::NotADirectory { .. })
        ));
        assert_eq!(
            paths(&t),
            [
                "/abs",
                "/escape",
                "/loop",
                "/real",
                "/real/one",
                "/real/two"
            ]
        );
    }

    #[test]
    fn hardlinks_share_nodes_until_replaced() {
        let mut t = MergeTree::new();
        t.begin_layer(1);
        let id = t.put(b"f", meta(0o644), file(3)).unwrap();
        t.link(b"g", b"f").unwrap();
        assert_eq!(t.lookup(b"g"), Some(id));
        assert!(t.link(b"h", b"missing").is_err());
        t.put(b"d", meta(0o755), NodeKind::Dir(vec![])).unwrap();
        assert!(t.link(b"h", b"d").is_err());
        t.begin_layer(2);
        let new = t.put(b"f", meta(0o600), file(9)).unwrap();
        assert_ne!(new, id);
        assert_eq!(t.lookup(b"g"), Some(id));
    }
}
