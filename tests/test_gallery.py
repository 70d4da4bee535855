"""The gallery, opened in a real headless browser: the page loads, every image it shows decodes, names are escaped."""
import json
import re
import shutil
import subprocess
from html import escape, unescape

import pytest
from PIL import Image

from fl_sim.learning.data import load_dataset
from fl_sim.results.gallery import client_folder, write_gallery
from fl_sim.results.outputs import append_jsonl, inside, read_jsonl, rewrite_jsonl, save_images, write_json

HOSTILE_STATUS = "error: <script>document.title='hacked'</script> & <b>bold</b>"

# Loads the gallery in a frame and, once everything has loaded, writes what the browser saw into this page.
CHECKER = """<!DOCTYPE html><html><body><iframe id="gallery" src="{src}"></iframe><script>
window.addEventListener("load", () => {{
  const doc = document.getElementById("gallery").contentDocument;
  const images = [...doc.images].map(i => ({{src: i.getAttribute("src"), width: i.naturalWidth}}));
  const report = {{title: doc.title, images, scripts: doc.scripts.length, text: doc.body.innerText}};
  const out = document.createElement("pre");
  out.id = "report";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
}});
</script></body></html>"""


def browser_report(page, profile) -> dict:
    """What headless Chromium saw after loading `page` in a frame."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed, and the gallery is checked in it: `sudo apt-get install chromium` "
                    "(make test installs it by itself in CI or as root)", pytrace=False)
    checker = page.parent / "checker.html"
    checker.write_text(CHECKER.format(src=page.as_uri()))
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
         "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom", checker.as_uri()],
        capture_output=True, text=True, timeout=120)
    start = done.stdout.find('<pre id="report">')
    assert start >= 0, f"the browser produced no report (exit {done.returncode}): {done.stderr[-2000:]}"
    text = done.stdout[start + len('<pre id="report">'): done.stdout.index("</pre>", start)]
    return json.loads(unescape(text))


@pytest.fixture
def run_folder(tmp_path, shared_data):
    """A finished two-round run as the ServerApp writes it, with real MNIST digits and one failed attack."""
    out = tmp_path / "run <&> 'quoted'"
    train = load_dataset("mnist", shared_data, train=True)
    write_json(out / "run.json", {"config": {"dataset": "mnist", "model": "lenet", "attack": "idlg"}, "seed": 0})
    for server_round in (1, 2):
        append_jsonl(out / "global.jsonl", {"round": server_round, "accuracy": 0.5, "loss": 1.0})
        for client in (0, 1):
            images, labels = train.tensors([10 * server_round + client, 10 * server_round + client + 5])
            folder = out / client_folder(server_round, client)
            save_images(folder / "truth.png", images)
            failed = server_round == 2 and client == 1
            if not failed:
                save_images(folder / "reconstruction.png", images.flip(-1))
            append_jsonl(out / "metrics.jsonl", {
                "round": server_round, "client": client, "status": HOSTILE_STATUS if failed else "ok",
                "psnr": None if failed else 31.5, "ssim": None if failed else 0.9, "mse": None if failed else 1e-3,
                "label_acc": 0.0 if failed else 1.0, "update_norm": 2.5 * server_round})
    return out


def test_the_gallery_loads_in_a_browser_with_every_image(run_folder, tmp_path):
    page = write_gallery(run_folder)
    report = browser_report(page, tmp_path / "profile")

    assert report["title"] == f"fl-sim run {run_folder.name}"
    expected = sorted(str(p.relative_to(run_folder)) for p in run_folder.rglob("*.png"))
    assert len(expected) == 8  # 4 truths, 3 reconstructions (one attack failed), the plot by round
    assert "leakage-by-round.png" in expected
    assert sorted(image["src"] for image in report["images"]) == expected
    for image in report["images"]:
        with Image.open(run_folder / image["src"]) as png:
            assert image["width"] == png.width, image
    assert "Round 1" in report["text"] and "Round 2" in report["text"] and "31.5" in report["text"]
    assert "update norm" in report["text"] and "\t5\t" in report["text"]  # round 2's update norm, 2.5 x 2


def test_names_and_statuses_are_shown_as_text_not_run_as_html(run_folder, tmp_path):
    page = write_gallery(run_folder)
    html = page.read_text()
    assert "<script>" not in html and escape(HOSTILE_STATUS) in html
    report = browser_report(page, tmp_path / "profile")
    assert report["scripts"] == 0
    assert HOSTILE_STATUS in report["text"]


def test_the_browser_check_notices_a_missing_image(run_folder, tmp_path):
    page = write_gallery(run_folder)
    (run_folder / client_folder(1, 0) / "reconstruction.png").unlink()
    widths = {image["src"]: image["width"] for image in browser_report(page, tmp_path / "profile")["images"]}
    assert widths[f"{client_folder(1, 0)}/reconstruction.png"] == 0
    assert widths[f"{client_folder(1, 0)}/truth.png"] > 0


def test_rows_from_a_tampered_metrics_file_name_no_path_outside_the_run(run_folder):
    """Only rows whose round and client are non-negative ints point at images; anything else is shown as text."""
    for row in ({"round": 1, "client": "../../../etc/passwd", "status": "ok", "psnr": "<b>loud</b>"},
                {"round": "1/../..", "client": 0, "status": "ok"},
                {"round": 1, "client": 1.5, "status": "ok", "reason": "<i>why</i>"}):
        append_jsonl(run_folder / "metrics.jsonl", row)
    html = write_gallery(run_folder).read_text()
    sources = re.findall(r"src='([^']*)'", html)
    assert sources[0] == "leakage-by-round.png"  # the plot by round survives the tampered rows too
    sources = sources[1:]
    assert len(sources) == 7 and all(re.fullmatch(r"round-\d{3}/client-\d{3}/(truth|reconstruction)\.png", s)
                                      for s in sources)
    assert escape("../../../etc/passwd") in html and escape("<b>loud</b>") in html and escape("<i>why</i>") in html
    for client in ("../x", -1, 1.5):
        with pytest.raises((TypeError, ValueError)):
            client_folder(1, client)
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(run_folder, "round-001/../../elsewhere")


def test_recovered_pairs_are_marked_and_failed_attacks_count_in_the_median(run_folder, tmp_path):
    rows = read_jsonl(run_folder / "metrics.jsonl")
    for row in rows:
        if row["status"] == "ok":
            row.update(psnr_images=[35.0, 12.0], recovered_at_30db=0.5, recovered_at_40db=0.0, label_share=0.5)
    rewrite_jsonl(run_folder / "metrics.jsonl", rows)
    html = write_gallery(run_folder).read_text()
    assert html.count("<span class='recovered'></span>") == 3  # one green frame per batch: 3 reconstructions
    assert html.count("<span class=''></span>") == 3
    text = browser_report(run_folder / "gallery.html", tmp_path / "profile")["text"]
    assert text.count("\u2713 35") == 3 and text.count("\u2717 12") == 3
    # round 2: 31.5 dB and a failed attack (0 dB): median 15.8, and the failure counted
    assert "2 attacked, 1 failed; PSNR median 15.8 dB" in text
    assert "2 attacked, 0 failed; PSNR median 31.5 dB" in text
    assert "images recovered: 50% at 30 dB" in text  # round 1: 2 of 4 images
