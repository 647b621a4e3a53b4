"""Zero the device code a shared library carries for GPUs other than one architecture,
so that it compresses to what one device call may carry.

MLX's CUDA build (libmlx.so, 114 MB) holds each kernel as cubins for sm_75, 80, 90, 100,
120 and 121 and PTX for compute_120 (.nv_fatbin, 67 MB). The GPU machine is an H100 or
H200 (sm_90), whose driver loads the sm_90 cubin alone. Each other entry's payload is
overwritten with zeros in place, its header kept: offsets, sizes and every ELF structure
stay as they were, the driver still sees (and skips) those entries, and xz squeezes the
zeros to nothing. The fatbin layout parsed (a header with magic 0xBA55ED50 and the
entries' total size, then entries of kind 1 PTX / 2 ELF with their header size, padded
payload size and SM version at offset 28) is what CUDA's fatbinary writes.

    python tools/prune_fatbin.py path/to/libmlx.so --keep 90
"""

from __future__ import annotations

import argparse
import struct
import subprocess
from collections import Counter
from pathlib import Path

MAGIC = 0xBA55ED50


def fatbin_section(path: Path) -> tuple[int, int]:
    """(file offset, size) of the .nv_fatbin section (readelf)."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        parts = line.replace("[ ", "[").split()
        if ".nv_fatbin" in parts:
            i = parts.index(".nv_fatbin")
            return int(parts[i + 3], 16), int(parts[i + 4], 16)
    raise SystemExit(f"{path} has no .nv_fatbin section")


def prune(data: bytearray, start: int, size: int, keep: set[int]) -> Counter[str]:
    """Zero every entry's payload whose SM version is not in keep; bytes kept/zeroed."""
    tally: Counter[str] = Counter()
    pos, end = start, start + size
    while pos < end:
        magic, _, header, total = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:  # fatbins are 8-byte aligned, padding between them
            pos += 8
            continue
        entry, stop = pos + header, pos + header + total
        while entry < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHII", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            body = entry + entry_header
            name = f"{'ptx' if kind == 1 else 'cubin'} sm_{sm}"
            if sm in keep:
                tally[f"kept {name}"] += payload
            else:
                data[body : body + payload] = bytes(payload)
                tally[f"zeroed {name}"] += payload
            entry = body + payload
        pos = stop
    return tally


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("library", type=Path)
    ap.add_argument("--keep", default="90", help="SM versions to keep, e.g. 90 or 80,90")
    args = ap.parse_args()
    start, size = fatbin_section(args.library)
    data = bytearray(args.library.read_bytes())
    tally = prune(data, start, size, {int(v) for v in args.keep.split(",")})
    args.library.write_bytes(data)
    for name, n in sorted(tally.items()):
        print(f"{name}: {n / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
