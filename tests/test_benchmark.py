"""The benchmark script runs end to end (with --tiny) and writes the rows it promises.

Nothing here is about speed: a loaded CI machine may be slow. What is checked is that
each suite starts its processes, measures, stops them all, prints a table and writes
JSON with one row per (size, server count) or per mode, every number positive.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"
SUITE_TIMEOUT_S = 30      # each --tiny suite takes a few seconds on 2 cores


def run_suite(out: pathlib.Path, *args: str) -> tuple[dict, str]:
    """Run one suite in its own process group; whatever happens, kill the group after."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--tiny", "--json", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=SUITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args[0]} --tiny did not finish in {SUITE_TIMEOUT_S} s") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text()), stdout


def test_transport_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "transport.json", "transport", "--servers", "1,2")
    assert result["suite"] == "transport"
    assert [(r["params"], r["servers"]) for r in result["rows"]] == [(100_000, 1), (100_000, 2)]
    for row in result["rows"]:
        assert row["bytes_per_round"] == 2 * 4 * row["params"]
        for key in ("ps_round_trips_per_s", "ps_gb_per_s", "raw_round_trips_per_s",
                    "raw_gb_per_s", "ps_over_raw"):
            assert row[key] > 0, key
    assert "| params | servers |" in stdout and "| 100K | 2 |" in stdout


def test_modes_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "modes.json", "modes")
    assert result["suite"] == "modes"
    assert [r["mode"] for r in result["rows"]] == ["bsp", "ssp", "asp"]
    for row in result["rows"]:
        assert row["steps"] == 3 and row["samples"] > 0
        assert row["samples_per_s"] > 0 and row["wall_s"] > 0
        assert row["final_loss"] is not None and row["final_loss"] > 0
    assert {r["mode"]: r["staleness"] for r in result["rows"]}["ssp"] == 2
    assert "| bsp |" in stdout and "| asp |" in stdout
