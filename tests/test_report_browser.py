"""Headless Chromium opens report.html offline, renders it, and logs no console errors.

Skipped, with the reason, only where no Chromium binary exists (``apt-get install -y chromium``; CI
installs it).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from reports.build import make_report

from .test_reports import dmkd_artifacts, fake_record

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (apt-get install -y chromium)")
CONSOLE = re.compile(r":CONSOLE[:(\]]|Uncaught|Failed to load resource|net::ERR_")


def screenshot(page: Path, png: Path, profile: Path) -> str:
    """Render ``page`` at 1400x2000 into ``png``; return Chromium's log (stderr), console lines included."""
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--screenshot={png}",
           "--window-size=1400,2000", page.resolve().as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr + proc.stdout


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if CONSOLE.search(line)]


def png_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_chromium_renders_report_without_console_errors(tmp_path):
    recs = ([fake_record("ft", s, f) for s, f in enumerate([0.2, 0.3])]
            + [fake_record("dmkd", s, 0.7, artifacts={"dmkd": dmkd_artifacts()}) for s in range(2)]
            + [fake_record("lwf", 0, 0.0, status="failed", error="boom")])
    page = make_report(recs, tmp_path / "report")["html"]
    png = tmp_path / "shot.png"
    log = screenshot(page, png, tmp_path / "profile")
    assert console_errors(log) == []
    assert png_size(png) == (1400, 2000)
    from PIL import Image

    img = Image.open(png).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # something was drawn: text and figures, not a blank page
    # The detector itself works: a page with a script error and a missing image is caught.
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>undefinedFn();</script></body></html>')
    bad_log = screenshot(bad, tmp_path / "bad.png", tmp_path / "profile2")
    assert any("undefinedFn" in line for line in console_errors(bad_log))
