#!/bin/sh
# Regenerates the tar target's seeds, fuzz/seeds/tar/tool-*: small real
# archives from GNU tar (gnu, posix, ustar and v7 formats; sparse files in
# old GNU and PAX 0.0, 0.1 and 1.0 form) and Python's tarfile (PAX with
# newlines in names and binary xattrs, a global header, negative times;
# GNU with long names and base-256 numbers), plus one hand-made old GNU
# sparse file whose map continues in an extension block.
#
# Replaces only tool-*; hand-kept regression inputs stay. Run as root
# (user xattrs on any file). Needs GNU tar, python3 and setfattr (attr).
set -eu
out=$(cd "$(dirname "$0")" && pwd)/seeds/tar
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$out"
rm -f "$out"/tool-*

# A little of everything. 512-byte records (-b 1) keep the seeds small.
t="$work/tree"
mkdir -p "$t/dir"
printf 'hello\n' > "$t/dir/file"
ln -s file "$t/dir/link"
ln "$t/dir/file" "$t/dir/hard"
mkfifo "$t/dir/fifo"
long="dir/$(printf 'a-long-name-%.0s' 1 2 3 4 5 6 7 8 9 10)"
printf 'x' > "$t/$long"
# A path ustar must split into prefix and name.
deep="$t/dir/deep/$(printf 'sub-directory/%.0s' 1 2 3 4 5 6 7 8)"
mkdir -p "$deep"
printf 'deep\n' > "$deep/file"
setfattr -n user.binary -v 0x0a000aff "$t/dir/file"
find "$t" -exec touch -h -d @1700000000 {} +
set -- dir/file dir/link dir/hard dir/fifo "$long"
tar -b 1 --xattrs --format=posix -cf "$out/tool-gnutar-posix" -C "$t" "$@"
tar -b 1 --format=gnu -cf "$out/tool-gnutar-gnu" -C "$t" "$@"
tar -b 1 --format=ustar -cf "$out/tool-gnutar-ustar" -C "$t" dir/file dir/link dir/hard dir/fifo dir/deep
tar -b 1 --format=v7 -cf "$out/tool-gnutar-v7" -C "$t" dir/file dir/link dir/hard

# Sparse: a hole, a block of data, a hole.
s="$work/sparse"
mkdir -p "$s"
printf 'data' | dd of="$s/sparse" bs=1 seek=16384 conv=notrunc 2>/dev/null
truncate -s 40000 "$s/sparse"
touch -d @1700000000 "$s/sparse"
tar -b 1 --sparse --format=gnu -cf "$out/tool-gnutar-sparse-gnu" -C "$s" sparse
for version in 0.0 0.1 1.0; do
  tar -b 1 --sparse --format=posix --sparse-version="$version" \
    -cf "$out/tool-gnutar-sparse-pax-$version" -C "$s" sparse
done

python3 - "$out" <<'PY'
import io
import sys
import tarfile

out = sys.argv[1]


def write(name, fmt, entries, pax_headers=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers or {},
                      encoding="utf-8", errors="surrogateescape") as archive:
        for info, data in entries:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    # Without the padding to a 10 KiB record: the last entry, two zero blocks.
    data = buf.getvalue().rstrip(b"\0")
    with open(f"{out}/{name}", "wb") as f:
        f.write(data + bytes(-len(data) % 512 + 1024))


def info(name, **fields):
    i = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(i, key, value)
    return i


cap = bytes([1, 0, 0, 2, 0x0A]) + bytes(15)
pax = info("new\nline-" + "n" * 120, uid=5_000_000, mtime=-5)
pax.pax_headers = {
    "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
    "mtime": "-1.25",
}
link = info("link", type=tarfile.SYMTYPE, linkname="target\nwith a newline-" + "t" * 110)
write("tool-python-pax", tarfile.PAX_FORMAT,
      [(pax, b"named with a newline\n"), (link, b""), (info("dir/", type=tarfile.DIRTYPE), b"")],
      pax_headers={"comment": "global", "uid": "7"})
gnu = info("g/" * 60 + "file", uid=4_000_000_000, gid=3, mtime=20_000_000_000)
hard = info("hard", type=tarfile.LNKTYPE, linkname="g/" * 60 + "file")
dev = info("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
write("tool-python-gnu", tarfile.GNU_FORMAT, [(gnu, b"gnu\n"), (hard, b""), (dev, b"")])


def octal(value, width):
    return ("%0*o" % (width - 1, value)).encode() + b"\0"


def gnu_sparse(name, runs, size):
    """An old GNU sparse entry: four runs in the header, the rest in
    extension blocks of 21."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = octal(0o644, 8)
    block[108:116] = octal(0, 8)
    block[116:124] = octal(0, 8)
    block[124:136] = octal(sum(n for _, n in runs), 12)
    block[136:148] = octal(1700000000, 12)
    block[156] = ord("S")
    block[257:265] = b"ustar  \0"
    head, rest = runs[:4], runs[4:]
    for i, (offset, length) in enumerate(head):
        block[386 + 24 * i:398 + 24 * i] = octal(offset, 12)
        block[398 + 24 * i:410 + 24 * i] = octal(length, 12)
    block[482] = 1 if rest else 0
    block[483:495] = octal(size, 12)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    blocks = [bytes(block)]
    while rest:
        ext = bytearray(512)
        chunk, rest = rest[:21], rest[21:]
        for i, (offset, length) in enumerate(chunk):
            ext[24 * i:24 * i + 12] = octal(offset, 12)
            ext[24 * i + 12:24 * i + 24] = octal(length, 12)
        ext[504] = 1 if rest else 0
        blocks.append(bytes(ext))
    data = b"".join(bytes([65 + i]) * n for i, (_, n) in enumerate(runs))
    data += bytes(-len(data) % 512)
    return b"".join(blocks) + data


# Whole blocks per run: GNU tar reads each run from a block boundary.
runs = [(i * 2048, 512) for i in range(6)]
with open(f"{out}/tool-handmade-gnu-sparse-extended", "wb") as f:
    f.write(gnu_sparse(b"extended", runs, 12288) + bytes(1024))
PY
ls -l "$out"
