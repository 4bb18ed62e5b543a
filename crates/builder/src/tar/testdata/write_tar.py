"""Writes a tar archive with Python's tarfile, for Darter's tar reader tests.

Reads a JSON spec on stdin: {"format": "pax" | "gnu", "entries": [...]},
each entry {"path", "link", "data": hex bytes; "kind": file | dir | symlink
| hardlink | char | block | fifo; "mode", "uid", "gid", "mtime", "major",
"minor": integers; "pax": [[hex key, hex value], ...]}. Writes the
archive to stdout. Bytes that are not UTF-8 pass through surrogateescape.
"""

import io
import json
import sys
import tarfile

FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def text(hex_bytes):
    return bytes.fromhex(hex_bytes).decode("utf-8", "surrogateescape")


def main():
    spec = json.load(sys.stdin)
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out,
        mode="w",
        format=FORMATS[spec["format"]],
        encoding="utf-8",
        errors="surrogateescape",
    ) as archive:
        for entry in spec["entries"]:
            info = tarfile.TarInfo(text(entry["path"]))
            info.type = TYPES[entry["kind"]]
            info.linkname = text(entry["link"])
            for field in ("mode", "uid", "gid", "mtime", "major", "minor"):
                setattr(info, {"major": "devmajor", "minor": "devminor"}.get(field, field), entry[field])
            for key, value in entry["pax"]:
                info.pax_headers[text(key)] = text(value)
            data = bytes.fromhex(entry["data"])
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data else None)
    sys.stdout.buffer.write(out.getvalue())


main()
