#!/usr/bin/env python3
"""Loose check of a browser screenshot (PNG, standard library only): decodes it and
verifies size, that it is not blank, and that given colours are drawn.

usage: png_check.py FILE.png MIN_WIDTH MIN_HEIGHT [#rrggbb ...]
Prints one line of numbers; exits 1 with the reason on failure."""
import struct
import sys
import zlib


def decode(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or ctype not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def main():
    path, min_w, min_h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    want = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in sys.argv[4:]]
    w, h, bpp, rows = decode(path)
    counts = {}
    nonwhite = 0
    for r in rows[::2]:
        for x in range(0, w * bpp, 2 * bpp):
            px = r[x:x + 3]
            counts[px] = counts.get(px, 0) + 1
            if px != b"\xff\xff\xff":
                nonwhite += 1
    total = sum(counts.values())
    frac = nonwhite / total
    print(f"{path}: {w}x{h}, {len(counts)} colours, {100 * frac:.1f}% non-white")
    if w < min_w or h < min_h:
        sys.exit(f"screenshot is {w}x{h}, expected at least {min_w}x{min_h}")
    if frac < 0.01 or len(counts) < 8:
        sys.exit("screenshot is blank (or nearly): the page did not render")
    if frac > 0.95:
        sys.exit("screenshot is almost entirely non-white: the page did not render as a report")
    for c in want:
        near = sum(n for px, n in counts.items() if all(abs(px[i] - c[i]) <= 24 for i in range(3)))
        if near < 20:
            sys.exit("colour #%02x%02x%02x (a run's lines) is not drawn" % c)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, zlib.error) as e:
        sys.exit(f"{sys.argv[1]}: {e}")
