//! Which files of an image a program opens: `strace -f -y -e trace=openat`
//! of the program chrooted into the tree, plus what the kernel opens
//! itself at exec (the program and its ELF interpreter).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::tools;

/// The regular files below `root` a chrooted program opened, with their
/// total size.
#[derive(Debug, Clone, Default)]
pub struct OpenedFiles {
    pub files: BTreeSet<PathBuf>,
    pub bytes: u64,
}

/// Runs `chroot ROOT PROGRAM ARGS` under strace and collects the regular
/// files below `root` it opened (paths on the host side).
pub fn opened_by(
    root: &Path,
    program: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    scratch: &Path,
) -> anyhow::Result<OpenedFiles> {
    let log = scratch.join("strace.log");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-y", "-e", "trace=openat,open", "-o"])
        .arg(&log)
        .arg("chroot")
        .arg(root)
        .arg(program)
        .args(args)
        .envs(envs.iter().copied());
    tools::output(&mut cmd)?;
    let trace = std::fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
    let mut paths: BTreeSet<PathBuf> = trace
        .split(|b| *b == b'\n')
        .filter_map(opened_path)
        .filter(|p| p.starts_with(root))
        .collect();
    let executable = resolve_in_root(root, Path::new(program))
        .with_context(|| format!("resolving {program} in {}", root.display()))?;
    if let Some(interp) = elf_interpreter(&executable)? {
        paths.extend(resolve_in_root(root, &interp));
    }
    paths.insert(executable);
    let mut opened = OpenedFiles::default();
    for path in paths {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                opened.bytes += meta.len();
                opened.files.insert(path);
            }
            _ => {}
        }
    }
    Ok(opened)
}

/// The path of the descriptor a successful open returned, from a strace
/// `-y` line such as `12 openat(AT_FDCWD, "x", O_RDONLY) = 3</root/x>`.
fn opened_path(line: &[u8]) -> Option<PathBuf> {
    let at = line.windows(3).rposition(|w| w == b" = ")?;
    let result = &line[at + 3..];
    let digits = result.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = result[digits..].strip_prefix(b"<")?;
    let end = rest.iter().rposition(|b| *b == b'>')?;
    (digits > 0).then(|| PathBuf::from(OsString::from_vec(rest[..end].to_vec())))
}

/// Most symlinks followed while resolving one path (as the kernel).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` as a process chrooted into `root` would: symlinks are
/// followed, absolute ones and `..` never leave `root`. Returns the
/// host-side path, or None if something on the way is missing.
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, path);
    let mut followed = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let host = root.join(&candidate);
        if !std::fs::symlink_metadata(&host).ok()?.is_symlink() {
            resolved = candidate;
            continue;
        }
        followed += 1;
        if followed > MAX_SYMLINKS {
            return None;
        }
        let target = std::fs::read_link(&host).ok()?;
        if target.is_absolute() {
            resolved = PathBuf::new();
        }
        push_components(&mut pending, &target);
    }
    Some(root.join(resolved))
}

/// Pushes `path`'s names (and `..`) so that the first pops first.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let names = path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    });
    let names: Vec<OsString> = names.collect();
    pending.extend(names.into_iter().rev());
}

/// The `PT_INTERP` of a 64-bit little-endian ELF file, if it has one.
fn elf_interpreter(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(pt_interp(&elf).map(|p| PathBuf::from(OsStr::from_bytes(p))))
}

fn pt_interp(elf: &[u8]) -> Option<&[u8]> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    // "\x7fELF", 64-bit, little-endian.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    (0..usize::from(phnum)).find_map(|i| {
        let header = phoff.checked_add(i.checked_mul(usize::from(phentsize))?)?;
        if u32_at(header)? != PT_INTERP {
            return None;
        }
        let (offset, size) = (u64_at(header + 8)?, u64_at(header + 32)?);
        let bytes = elf.get(offset..offset.checked_add(size)?)?;
        Some(bytes.strip_suffix(b"\0").unwrap_or(bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_lines_yield_only_successful_opens() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"42 openat(AT_FDCWD, "/usr/lib/x.py", O_RDONLY|O_CLOEXEC) = 3</r/usr/lib/x.py>"#,
                Some("/r/usr/lib/x.py"),
            ),
            (
                r#"42 <... openat resumed>) = 12</r/a b/c>"#,
                Some("/r/a b/c"),
            ),
            (
                r#"42 openat(AT_FDCWD, "/nope", O_RDONLY) = -1 ENOENT (No such file or directory)"#,
                None,
            ),
            (
                r#"42 openat(AT_FDCWD, "/x", O_RDONLY <unfinished ...>"#,
                None,
            ),
            ("", None),
        ];
        for (line, expected) in cases {
            assert_eq!(
                opened_path(line.as_bytes()),
                expected.map(PathBuf::from),
                "{line}"
            );
        }
    }

    #[test]
    fn resolution_follows_symlinks_without_leaving_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/python3.11"), b"x").unwrap();
        std::os::unix::fs::symlink("python3.11", root.join("usr/bin/python3")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let target = root.join("usr/bin/python3.11");
        for path in [
            "/usr/bin/python3",
            "/bin/python3",
            "/abs",
            "bin/../bin/python3",
        ] {
            assert_eq!(
                resolve_in_root(root, Path::new(path)),
                Some(target.clone()),
                "{path}"
            );
        }
        // `..` stops at the root: the escape resolves inside it (missing).
        assert_eq!(resolve_in_root(root, Path::new("/escape")), None);
        assert_eq!(resolve_in_root(root, Path::new("/loop")), None);
    }

    #[test]
    fn finds_the_interpreter_of_a_real_executable_and_rejects_garbage() {
        let interp = elf_interpreter(Path::new("/bin/sh")).unwrap().unwrap();
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        assert_eq!(pt_interp(b"\x7fELF\x02\x01"), None);
        assert_eq!(pt_interp(b"#!/bin/sh\n"), None);
        let mut truncated = std::fs::read("/bin/sh").unwrap();
        truncated.truncate(100);
        assert_eq!(pt_interp(&truncated), None);
    }
}
