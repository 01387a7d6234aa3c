#!/usr/bin/env python3
"""Draw training-loss curves of one or more runs on shared axes, as a PNG, in pure Python.

    python scripts/plot_loss.py RUN.json [RUN.json ...] --out loss.png [--labels a,b] [--title T]

Each RUN is a JSON file with ``"losses"``: the mean training loss of each step, in order
(a cluster run's ``summary.json`` has that key; a single-process reference run writes the
same shape). One line per run, distinct colours, step on x and loss on y, with tick labels
and a legend (labels default to the file names).

No matplotlib: the picture is a list of RGB rows drawn by hand (Bresenham lines, a 3x5
bitmap font drawn at 2x) and written by ``write_png``, which is the whole PNG format a
viewer needs: the signature, IHDR, one zlib-compressed IDAT of rows each prefixed with
filter byte 0 (none), and IEND, every chunk closed by its CRC-32. Text is drawn in capitals:
the font has A-Z, digits and a few signs; other characters come out as '?'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import zlib

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 32, 40   # margins around the plot area, in pixels
SCALE = 2                                   # font pixels per glyph dot: 3x5 -> 6x10
ADVANCE = 4 * SCALE                         # glyph width plus one dot of spacing
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),    # matplotlib's
          (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]  # tab10, cycled

# 3x5 glyphs: five octal digits, one per row from the top; in a row 4 = left dot,
# 2 = middle, 1 = right ("75557" is a 0: full row, sides, sides, sides, full row).
FONT = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717",
    "6": "74757", "7": "71122", "8": "75757", "9": "75717", ".": "00002", "-": "00700",
    "+": "02720", "_": "00007", ":": "02020", "/": "11244", "(": "24442", ")": "21112",
    ",": "00024", "=": "07070", " ": "00000", "?": "71202",
    "A": "25755", "B": "65656", "C": "34443", "D": "65556", "E": "74647", "F": "74644",
    "G": "34553", "H": "55755", "I": "72227", "J": "11152", "K": "55655", "L": "44447",
    "M": "57755", "N": "65555", "O": "25552", "P": "65644", "Q": "25563", "R": "65655",
    "S": "34216", "T": "72222", "U": "55557", "V": "55552", "W": "55775", "X": "55255",
    "Y": "55222", "Z": "71247",
}


def write_png(path: str, pixels_rgb_rows) -> None:
    """Write an 8-bit RGB PNG. ``pixels_rgb_rows``: rows top to bottom, all one width, each
    either bytes of 3 * width (r, g, b, r, ...) or a sequence of (r, g, b) tuples."""
    rows = [bytes(r) if isinstance(r, (bytes, bytearray)) else bytes(c for px in r for c in px)
            for r in pixels_rgb_rows]
    width, height = (len(rows[0]) // 3 if rows else 0), len(rows)
    if width == 0 or any(len(r) != 3 * width for r in rows):
        raise ValueError("write_png needs at least one pixel and rows of equal width")

    def chunk(kind: bytes, data: bytes) -> bytes:           # length, type, data, CRC
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, no interlace
    raw = b"".join(b"\x00" + r for r in rows)                       # filter 0 before each row
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Canvas:
    """A WIDTH x HEIGHT picture: ``rows[y]`` is a bytearray of 3 * WIDTH; (0, 0) is top left."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(WHITE) * width) for _ in range(height)]

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:    # clip silently at the edges
            self.rows[y][3 * x:3 * x + 3] = bytes(color)

    def fill(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Paint the rectangle with corners (x0, y0) and (x1, y1), both inclusive."""
        for y in range(max(y0, 0), min(y1 + 1, self.height)):
            self.rows[y][3 * x0:3 * (x1 + 1)] = bytes(color) * (x1 + 1 - x0)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thick: int = 1) -> None:
        """Bresenham's line; ``thick`` stamps a thick x thick square at each point."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for i in range(thick):
                for j in range(thick):
                    self.dot(x0 + i, y0 + j, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color=BLACK) -> None:
        """Draw s with its top-left corner at (x, y), in capitals."""
        for k, ch in enumerate(s.upper()):
            for row, digit in enumerate(FONT.get(ch, FONT["?"])):
                for col in range(3):
                    if int(digit) & (4 >> col):
                        for i in range(SCALE):
                            for j in range(SCALE):
                                self.dot(x + k * ADVANCE + col * SCALE + i,
                                         y + row * SCALE + j, color)


def ticks(lo: float, hi: float, min_step: float = 0.0, most: int = 8) -> tuple[list, int]:
    """Round values inside [lo, hi], 1, 2 or 5 times a power of ten apart (at least
    min_step), at most ``most`` of them; and the decimals their labels need."""
    span = hi - lo
    for mult in (1, 2, 5, 10, 20, 50):
        step = max(mult * 10 ** math.floor(math.log10(span / most)), min_step)
        if span / step <= most:
            break
    digits = max(0, -math.floor(math.log10(step) + 1e-9))   # 0.2 -> 1, 0.05 -> 2, 50 -> 0
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, digits) for k in range(first, last + 1)], digits


def plot(runs: dict[str, list[float]], path: str, title: str | None = None) -> None:
    """Draw each run (label -> per-step losses) as a line and write the PNG to path.
    Non-finite losses (a diverged step) are left out, breaking the line there."""
    finite = [v for losses in runs.values() for v in losses if math.isfinite(v)]
    if not finite:
        raise ValueError("no finite loss to plot")
    steps = max(len(losses) for losses in runs.values())
    y_lo, y_hi = min(finite), max(finite)
    pad = (y_hi - y_lo) * 0.05 or 0.5                       # a flat curve still gets a range
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = max(steps - 1, 1)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT - 1, TOP, HEIGHT - BOTTOM - 1   # plot area, inclusive

    def px(step: int) -> int:
        return round(x0 + (x1 - x0) * step / x_hi)

    def py(loss: float) -> int:                             # larger loss -> higher up
        return round(y1 - (y1 - y0) * (loss - y_lo) / (y_hi - y_lo))

    c = Canvas(WIDTH, HEIGHT)
    y_ticks, y_digits = ticks(y_lo, y_hi)
    for v in y_ticks:                                       # grid and labels first: lines on top
        c.line(x0, py(v), x1, py(v), GRID)
        label = f"{v:.{y_digits}f}"
        c.text(x0 - 6 - len(label) * ADVANCE, py(v) - 5, label)
    for v in ticks(0, x_hi, min_step=1)[0]:                 # steps are whole numbers
        c.line(px(v), y0, px(v), y1, GRID)
        label = str(int(v))
        c.text(px(v) - len(label) * ADVANCE // 2, y1 + 6, label)
    c.line(x0, y1, x1, y1, BLACK)                           # axes
    c.line(x0, y0, x0, y1, BLACK)
    c.text((x0 + x1) // 2 - 2 * ADVANCE, HEIGHT - 14, "step")
    c.text(4, 8, "loss")
    if title:
        c.text((WIDTH - len(title) * ADVANCE) // 2, 8, title)

    for k, (label, losses) in enumerate(runs.items()):
        color, prev = COLORS[k % len(COLORS)], None
        for step, loss in enumerate(losses):
            if not math.isfinite(loss):
                prev = None
                continue
            point = (px(step), py(loss))
            c.line(*(prev or point), *point, color, thick=2)
            prev = point
    # Legend last, on a white box in the top right corner, so no curve runs through it.
    lx = x1 - 8 - 28 - max(len(label) for label in runs) * ADVANCE
    c.fill(lx - 6, y0 + 2, x1 - 2, y0 + 12 + 16 * len(runs), WHITE)
    for k, label in enumerate(runs):
        ly = y0 + 8 + 16 * k
        c.line(lx, ly + 4, lx + 20, ly + 4, COLORS[k % len(COLORS)], thick=2)
        c.text(lx + 28, ly, label)
    write_png(path, c.rows)


def load_losses(path: str) -> list[float]:
    """The "losses" list of a run file; ValueError (with the path) if there is none."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    losses = data.get("losses") if isinstance(data, dict) else None
    if (not isinstance(losses, list) or not losses
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses)):
        raise ValueError(f'{path}: no "losses" list of numbers (one mean loss per step)')
    return [float(v) for v in losses]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help='JSON file with a "losses" list')
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--labels", help="comma-separated legend labels, one per RUN")
    p.add_argument("--title", help="title above the plot")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [
        os.path.splitext(os.path.basename(r))[0] for r in a.runs]
    if len(labels) != len(a.runs):
        p.error(f"--labels names {len(labels)} runs, but {len(a.runs)} were given")
    if len(set(labels)) != len(labels):
        p.error(f"labels must differ: {labels} (use --labels)")
    try:
        runs = {label: load_losses(path) for label, path in zip(labels, a.runs)}
        plot(runs, a.out, a.title)
    except OSError as exc:                      # e.g. --out in a folder that does not exist
        p.error(f"{a.out}: cannot write: {exc.strerror or exc}")
    except ValueError as exc:
        p.error(str(exc))                       # usage and message on stderr, exit code 2
    print(f"plot_loss.py: wrote {a.out} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
