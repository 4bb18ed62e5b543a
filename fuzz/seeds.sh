#!/bin/sh
# Regenerates the committed seed corpora in fuzz/seeds/<target>/ from real
# images: builds the `darter` binary, builds three tiny images that between
# them use every codec, both digests, holes, hardlinks, symlinks, xattrs,
# special files and a multi-block directory, and extracts their bootstraps,
# blob tails and frames (fuzz/examples/make_seeds.rs).
#
# Replaces only generated seeds (image-*); hand-kept regression inputs stay.
# Run as root (device nodes, trusted.* xattrs). Needs setfattr (Debian: attr).
set -eu
fuzz_dir=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$fuzz_dir")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# DARTER=path/to/darter uses that binary instead of building one.
if [ -z "${DARTER:-}" ]; then
  cargo build --quiet --manifest-path "$repo/Cargo.toml" -p darter
  DARTER="${CARGO_TARGET_DIR:-$repo/target}/debug/darter"
fi
darter=$DARTER

# basic: a little of everything, 4 KiB chunks so files span several chunks.
t="$work/basic"
mkdir -p "$t/etc" "$t/bin" "$t/data" "$t/run" "$t/dev"
echo darter-seed > "$t/etc/hostname"
: > "$t/etc/empty"
ln "$t/etc/hostname" "$t/etc/hardlink"
ln -s ../etc/hostname "$t/bin/link"
i=0
while [ "$i" -lt 600 ]; do echo "line $i of a compressible file"; i=$((i + 1)); done > "$t/bin/tool"
# One data chunk, then a hole, then another data chunk.
printf 'head' > "$t/data/sparse"
printf 'tail' | dd of="$t/data/sparse" bs=1 seek=12288 conv=notrunc 2>/dev/null
mkfifo "$t/run/fifo"
mknod "$t/dev/null" c 1 3
setfattr -n user.note -v seed "$t/etc/hostname"
setfattr -n trusted.overlay.opaque -v y "$t/etc"
setfattr -n security.selinux -v system_u:object_r:bin_t "$t/bin/tool"

# wide: a directory spanning two blocks (hardlinks keep it one inode).
t="$work/wide"
mkdir -p "$t/many"
i=0
while [ "$i" -lt 150 ]; do echo "payload $i" >> "$t/payload"; i=$((i + 1)); done
i=0
while [ "$i" -lt 150 ]; do ln "$t/payload" "$t/many/entry-$i-with-a-longer-name"; i=$((i + 1)); done

# raw: incompressible data, stored as raw frames.
t="$work/raw"
mkdir -p "$t"
i=0
while [ "$i" -lt 64 ]; do printf '%s' "$i" | sha256sum; i=$((i + 1)); done > "$t/digests"

find "$work/basic" "$work/wide" "$work/raw" -exec touch -h -d @1700000000 {} +
"$darter" --quiet build "$work/basic" -o "oci:$work/img-basic" --chunk-size 4K --frame-size 16K
"$darter" --quiet build "$work/wide" -o "oci:$work/img-wide" --compressor lz4 --digest sha256 --chunk-size 16K
"$darter" --quiet build "$work/raw" -o "oci:$work/img-raw" --compressor none

for target in bootstrap chunk_table frame image; do
  mkdir -p "$fuzz_dir/seeds/$target"
  rm -f "$fuzz_dir/seeds/$target"/image-*
done
cargo run --quiet --manifest-path "$fuzz_dir/Cargo.toml" --example make_seeds -- \
  "$fuzz_dir/seeds" "$work/img-basic" "$work/img-wide" "$work/img-raw"
