"""scripts/plot_loss.py: the PNG it writes is valid, and the curves land where they should.

The oracle is an independent PNG reader: it walks the chunks, checks every CRC, reads the
size from IHDR and undoes filter 0 itself, so a wrong length, CRC or row layout in
``write_png`` fails here even if a lenient viewer would show the picture.
"""
import importlib.util
import json
import pathlib
import struct
import subprocess
import sys
import zlib

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "plot_loss.py"
spec = importlib.util.spec_from_file_location("plot_loss", SCRIPT)
plot_loss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_loss)


def read_png(path) -> tuple[int, int, list[list[tuple]]]:
    """(width, height, rows of (r, g, b)) of an 8-bit RGB, non-interlaced, filter-0 PNG."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = []
    for y in range(height):
        line = raw[y * stride:(y + 1) * stride]
        assert line[0] == 0                                     # filter type 0: none
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(width)])
    return width, height, rows


def test_write_png_round_trips_exact_pixels(tmp_path):
    pixels = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(1, 2, 3), (4, 5, 6), (7, 8, 9)]]
    plot_loss.write_png(tmp_path / "a.png", pixels)
    assert read_png(tmp_path / "a.png") == (3, 2, pixels)
    plot_loss.write_png(tmp_path / "b.png", [bytes(c for px in row for c in px) for row in pixels])
    assert read_png(tmp_path / "b.png") == (3, 2, pixels)      # rows as bytes: the same PNG


def test_plot_draws_each_run_in_its_colour_where_its_losses_are(tmp_path):
    falling = [3.0 - 2.0 * i / 49 for i in range(50)]          # 3 -> 1
    rising = [1.0 + 2.0 * i / 29 for i in range(30)]           # 1 -> 3, a shorter run
    plot_loss.plot({"falling": falling, "rising": rising}, tmp_path / "loss.png", title="t")
    width, height, rows = read_png(tmp_path / "loss.png")
    assert (width, height) == (plot_loss.WIDTH, plot_loss.HEIGHT)
    top, bottom = plot_loss.TOP, height - plot_loss.BOTTOM
    left = plot_loss.LEFT
    quarter = left + (width - plot_loss.RIGHT - left) // 4
    # The left quarter of the plot area, far from the legend (top right): falling starts
    # high and rising starts low, so their pixels' mean heights must be in that order.
    heights = {}
    for name, color in zip(["falling", "rising"], plot_loss.COLORS):
        ys = [y for y in range(top, bottom) for x in range(left + 2, quarter)
              if rows[y][x] == color]
        assert len(ys) > 20, name
        heights[name] = sum(ys) / len(ys)
    assert heights["falling"] < (top + bottom) / 2 < heights["rising"]
    # Rising ends at step 29 of 49: right of its end, only the falling curve is drawn.
    end = left + (width - plot_loss.RIGHT - left) * 31 // 49
    assert not any(rows[y][x] == plot_loss.COLORS[1]
                   for y in range(top + 60, bottom) for x in range(end, width))


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=30)


def test_cli_writes_a_png_with_labels(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"losses": [2.0, 1.5, 1.2, 1.1]}))
    out = tmp_path / "loss.png"
    done = run_cli(tmp_path / "a.json", tmp_path / "b.json", "--out", out,
                   "--labels", "cluster,oracle", "--title", "gpt")
    assert done.returncode == 0, done.stderr
    assert read_png(out)[:2] == (plot_loss.WIDTH, plot_loss.HEIGHT)


@pytest.mark.parametrize("content", [{"loss": [1.0, 0.5]}, {"losses": "1.0"}, {"losses": []},
                                     None])
def test_cli_without_a_losses_list_exits_2_with_a_message(tmp_path, content):
    run = tmp_path / "run.json"
    if content is not None:                                     # None: the file is missing
        run.write_text(json.dumps(content))
    done = run_cli(run, "--out", tmp_path / "loss.png")
    assert done.returncode == 2
    assert str(run) in done.stderr and "Traceback" not in done.stderr
    assert ('"losses"' in done.stderr) if content is not None else ("cannot read" in done.stderr)
    assert not (tmp_path / "loss.png").exists()
