"""`snakemake --report`: generated from a real run and looked at in headless Chromium."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time

import pytest
from conftest import make_image, run_snakemake, skip_unless_ci, snakemake_command, write_config
from labelled import make_labelled_tree

pytestmark = pytest.mark.slow

#: The report's result categories and what each shows: an image, or a page in a frame.
CATEGORIES = {
    "Summary": ["summary.html"],
    "Labels": ["labels.png"],
    "Embeddings": ["map.html", "neighbours.html"],
    "Trained head": ["confusion.png"],
}

#: Whether every image of the current document (``img`` and SVG ``image``) decodes.
_IMAGES_DECODED = """async () => {
    const sources = [
        ...[...document.images].map(i => i.src),
        ...[...document.querySelectorAll("svg image")].map(i => i.getAttribute("href")),
    ];
    return Promise.all(sources.map(src => new Promise(done => {
        const probe = new Image();
        probe.onload = () => done(probe.naturalWidth);
        probe.onerror = () => done(0);
        probe.src = src;
    })));
}"""


_DECODED_WIDTH = """i => i.complete && i.naturalWidth ? i.naturalWidth : new Promise(done => {
    i.addEventListener("load", () => done(i.naturalWidth));
    i.addEventListener("error", () => done(0));
})"""


def _frame(page, name: str, seconds: float = 30.0):
    """The report's frame showing ``name``, once it is there (a loaded machine is slow)."""
    deadline = time.monotonic() + seconds
    while True:
        for frame in page.frames:
            if frame.url.startswith("data:text/html") and f"filename={name}" in frame.url:
                frame.wait_for_load_state()
                return frame
        assert time.monotonic() < deadline, f"no frame shows {name}"
        page.wait_for_timeout(100)


def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A run with a trained head and a broken image, and its report."""
    base = tmp_path_factory.mktemp("report")
    make_labelled_tree(base / "images", train=6, val=4)
    (base / "images" / "extra").mkdir()
    (base / "images" / "extra" / "broken.png").write_bytes(b"not a png")
    config = write_config(
        base / "config.yaml",
        images="images",
        results="results",
        classify={"head": "knn", "labels": "images", "topk": 2},
        report={"points": 20, "queries": 3},
    )
    run_snakemake(base, config)
    report = base / "report.html"
    cmd = snakemake_command(base, config, "--report", str(report))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "report": report, "results": base / "results"}


def test_the_pages_say_what_the_run_did(report):
    results = report["results"]
    summary = (results / "report" / "summary.html").read_text()
    assert '<td class="n">7</td>' in summary  # {train,val}/{blue,green,red} and extra
    assert "Failures (1)" in summary and "broken.png" in summary
    assert "embed_classify_store" in summary and "seconds per job" in summary
    metrics = json.loads((results / "heads" / "knn" / "metrics.json").read_text())
    assert f"{round(metrics['accuracy'], 4)}" in summary
    neighbours = (results / "report" / "neighbours.html").read_text()
    assert neighbours.count('class="strip"') == 3
    assert "20 images drawn at random" in (results / "report" / "map.html").read_text()


def test_the_report_shows_every_page_and_its_images_render_in_chromium(report):
    try:
        from playwright import sync_api
    except ImportError:
        skip_unless_ci("needs playwright (pip install -e '.[test]')")
    browser_path = _browser_path()
    if browser_path is None:
        skip_unless_ci("no Chromium here: apt-get install chromium (.ci/run does)")
    seen = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for category, files in CATEGORIES.items():
            page.goto(report["report"].as_uri())
            page.get_by_role("link", name=category, exact=True).first.click()
            rows = page.locator("tr", has=page.locator("a[iconname=eye]"))
            names = [row.inner_text().strip().rsplit("/", 1)[-1] for row in rows.all()]
            assert sorted(names) == sorted(files), (category, names)
            for i, name in enumerate(names):
                rows.nth(i).locator("a[iconname=eye]").click()
                if name.endswith(".html"):
                    frame = _frame(page, name)
                    seen[name] = frame.evaluate(_IMAGES_DECODED)
                    assert frame.locator("h2").inner_text() in {
                        "Run summary",
                        "Map of the embeddings",
                        "Nearest neighbours",
                    }
                    if name == "map.html":  # a point shows its thumbnail on hover
                        point = frame.locator("svg .pt").first
                        point.hover()
                        shown = point.locator("image").evaluate("e => getComputedStyle(e).display")
                        assert shown != "none"
                else:
                    shown = page.locator(f"img[src*='filename={name}']")
                    shown.wait_for(timeout=30_000)
                    seen[name] = [shown.evaluate(_DECODED_WIDTH)]
        browser.close()
    assert set(seen) == {name for files in CATEGORIES.values() for name in files}
    assert seen.pop("summary.html") == []  # a page of tables
    for name, widths in seen.items():
        assert widths and all(w > 0 for w in widths), (name, widths)
    assert len(seen["map.html"]) == 20 and len(seen["neighbours.html"]) == 3 * 7


def test_thumbnails_are_kept_by_content_and_made_again_when_it_changes(tmp_path):
    """The map's thumbnails are kept between reports by the image's stored sha256 (no file
    status or bucket request per image). A file replaced since it was embedded: a kept
    thumbnail still shows what was embedded; one made now shows the file as it is, and is not
    kept under the old content's key."""
    from snakembed.report import _Thumbnails

    image = make_image(tmp_path / "a.jpg", size=(120, 90), seed=1)
    first = hashlib.sha256(image.read_bytes()).hexdigest()
    kept = tmp_path / ".thumbnails.json"
    thumbnails = _Thumbnails(kept)
    [uri] = thumbnails([image], 96, [first])
    assert uri.startswith("data:image/jpeg;base64,") and thumbnails.save() == 1
    again = _Thumbnails(kept)
    assert again([image], 96, [first]) == [uri] and again.save() == 0  # none made

    make_image(image, size=(120, 90), seed=2)  # replaced after it was embedded
    assert _Thumbnails(kept)([image], 96, [first]) == [uri]
    elsewhere = tmp_path / "other" / ".thumbnails.json"
    elsewhere.parent.mkdir()
    for _ in range(2):  # made again each time: not kept
        made = _Thumbnails(elsewhere)
        [shown] = made([image], 96, [first])
        assert shown != uri and made.save() == 1
    second = hashlib.sha256(image.read_bytes()).hexdigest()
    latest = _Thumbnails(elsewhere)
    assert latest([image], 96, [second]) == [shown] and latest.save() == 1
    final = _Thumbnails(elsewhere)
    assert final([image], 96, [second]) == [shown] and final.save() == 0  # kept
