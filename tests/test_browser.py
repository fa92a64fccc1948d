"""The HTML report in a real browser: headless Chromium decodes every image and requests nothing.

Three independent checks: the HTML references nothing but ``data:`` URIs and ``#`` anchors;
a copy of the page with a small inline script reports, after load, how many ``<img>`` decoded
(``naturalWidth > 0``) and which resources the page fetched (read back with ``--dump-dom``);
Chromium's net log, with every host name unresolvable, holds no request started by the page.
A control page with one external image shows that the checks do catch a request. The
screenshot is written next to the report as ``report.png``. ``.ci/run`` installs Debian's
``chromium`` when it can; without it these tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfcam.model import create_model
from selfcam.checkpoint import save_checkpoint
from selfcam.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium when run as root)"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const decoded = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-decoded", decoded + "/" + imgs.length);
  const fetched = performance.getEntriesByType("resource").map((e) => e.name);
  document.body.setAttribute("data-fetched", JSON.stringify(fetched));
});
</script>
"""
URL_ATTRS = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background"}


class _Refs(HTMLParser):
    """Every URL-valued attribute, the number of ``<img>`` and the text of ``<style>`` blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.images = 0
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.images += tag == "img"
        self._in_style = tag == "style"
        self.refs += [v or "" for k, v in attrs if k in URL_ATTRS]
        self.styles += [v or "" for k, v in attrs if k == "style"]

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with the fixed flags, a fresh profile and no host name resolvable."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def _probe(tmp_path: Path, page: Path) -> tuple[str, list[str], list[str]]:
    """Load a copy of ``page`` with :data:`PROBE` appended: ``(decoded "k/n", fetched URLs, page requests in the net log)``."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
    log = tmp_path / f"{page.stem}.netlog.json"
    dom = _chromium(tmp_path, f"--log-net-log={log}", "--run-all-compositor-stages-before-draw",
                    "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()).stdout  # fmt: skip
    body = re.search(r"<body[^>]*>", dom)
    assert body, f"no <body> in the dumped DOM: {dom[:500]}"
    decoded = re.search(r'data-decoded="([^"]*)"', body.group(0))
    fetched = re.search(r'data-fetched="([^"]*)"', body.group(0))
    assert decoded and fetched, f"the probe script did not run: {body.group(0)[:300]}"
    return decoded.group(1), json.loads(fetched.group(1).replace("&quot;", '"')), _page_requests(log)


def _page_requests(log: Path) -> list[str]:
    """URLs of the requests the page started (the browser's own, initiator "not an origin", left out)."""
    doc = json.loads(log.read_text(encoding="utf-8"))
    start = doc["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in doc["events"]
            if e["type"] == start and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real report: one tiny run with history, an evaluation with curves and matrices."""
    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    run = root / "plain-run"
    model = create_model("plain", "resnet8", 10, 1, {"stem_stride": 2})
    save_checkpoint(model, run, data={"name": "cluttered-digits", "size": 32}, train={"seed": 0})
    (run / "history.json").write_text(json.dumps([{"epoch": e, "train_loss": 2 - e / 2, "val_acc": e / 4} for e in range(3)]))
    ev = root / "eval"
    ev.mkdir()
    (ev / "evaluation.json").write_text(json.dumps({
        "dataset": "cluttered-digits", "runs": {"a": {"results": {"self": {"accuracy": 0.5}}},
                                                "b": {"results": {"self": {"accuracy": 0.75}}}},
        "curves": {"a": {"self": {"deletion": [0.9, 0.4, 0.1], "insertion": [0.1, 0.5, 0.9]}}},
        "stability": {"self": {"iou": 0.5, "dice": 0.6, "iou_matrix": [[1, 0.5], [0.5, 1]]}}}))  # fmt: skip
    return build_report([run, ev], root / "report.html", per_class=1, methods=("gradcam",))


def test_report_references_nothing_outside_the_page(report: Path) -> None:
    refs = _Refs()
    refs.feed(report.read_text(encoding="utf-8"))
    assert refs.images >= 10 * 3 + 3  # gallery (10 classes x input, map, Grad-CAM), curves, two figures
    outside = [r for r in refs.refs if not r.startswith(("data:", "#"))]
    assert outside == [], outside
    css = " ".join(refs.styles)
    assert "@import" not in css and [u for u in re.findall(r"url\(([^)]*)\)", css) if "data:" not in u] == []


def test_chromium_decodes_every_image_requests_nothing_and_screenshots(report: Path, tmp_path: Path) -> None:
    refs = _Refs()
    refs.feed(report.read_text(encoding="utf-8"))
    decoded, fetched, requests = _probe(tmp_path, report)
    assert decoded == f"{refs.images}/{refs.images}"
    assert fetched == [] and requests == []
    shot = report.with_name("report.png")
    log = tmp_path / "screenshot.netlog.json"
    _chromium(tmp_path, f"--log-net-log={log}", f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert _page_requests(log) == []
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1280) and pixels.std() > 10  # a page was drawn, not a blank window


def test_the_checks_catch_an_external_image(tmp_path: Path) -> None:
    page = tmp_path / "control.html"
    page.write_text('<!doctype html><html><body><img src="http://example.invalid/a.png" alt="x"></body></html>')
    decoded, fetched, requests = _probe(tmp_path, page)
    assert decoded == "0/1"
    assert fetched == ["http://example.invalid/a.png"] and requests == ["http://example.invalid/a.png"]
