"""The gallery, opened in a real headless browser at 1400 px: the page loads, every image it shows decodes and is
a tile a person can see (at least twice the images' size, no sideways scrolling), big runs are split into small
pages, names are escaped."""
import io
import json
import re
import shutil
import subprocess
from html import escape, unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_sim.learning.data import load_dataset
from fl_sim.results import gallery
from fl_sim.results.gallery import client_folder, write_gallery
from fl_sim.results.outputs import append_jsonl, inside, read_jsonl, rewrite_jsonl, save_images, write_json

HOSTILE_STATUS = "error: <script>document.title='hacked'</script> & <b>bold</b>"
WIDTH = 1400  # the browser window's width, in CSS pixels
MNIST_SIZE = 28

# Loads the gallery in a frame as big as the window and, once everything has loaded, writes what the browser
# saw into this page: the images, the tiles' boxes, and whether the page is wider than its window.
CHECKER = """<!DOCTYPE html><html><head><style>body {{ margin: 0; overflow: hidden; }}
iframe {{ border: 0; display: block; width: {width}px; height: {height}px; }}</style></head><body>
<iframe id="gallery" src="{src}"></iframe><script>
window.addEventListener("load", () => {{
  const doc = document.getElementById("gallery").contentDocument;
  const images = [...doc.images].map(i => ({{src: i.getAttribute("src"), width: i.naturalWidth}}));
  const box = e => {{ const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }};
  const pairs = [...doc.querySelectorAll(".pairs figure")].map(f => ({{
    box: box(f), tiles: [...f.querySelectorAll("img")].map(box), caption: f.querySelector("figcaption").textContent,
    recovered: f.classList.contains("recovered"), title: f.title}}));
  const report = {{title: doc.title, images, pairs, scripts: doc.scripts.length, text: doc.body.innerText,
                  scrollWidth: doc.documentElement.scrollWidth, clientWidth: doc.documentElement.clientWidth,
                  links: [...doc.links].map(a => a.getAttribute("href"))}};
  const out = document.createElement("pre");
  out.id = "report";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
}});
</script></body></html>"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed, and the gallery is checked in it: `sudo apt-get install chromium` "
                    "(make test installs it by itself in CI or as root)", pytrace=False)
    return path


def _browser(profile, height: int, *action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
         "--allow-file-access-from-files", f"--window-size={WIDTH},{height}", "--force-device-scale-factor=1",
         "--virtual-time-budget=5000", *action],
        capture_output=True, text=True, timeout=120)


def _checker(page: Path, height: int) -> Path:
    checker = page.parent / f"checker-{page.stem}.html"
    checker.write_text(CHECKER.format(src=page.as_uri(), width=WIDTH, height=height))
    return checker


def browser_report(page, profile, height: int = 20000) -> dict:
    """What headless Chromium saw after loading `page` in a frame of WIDTH x `height` CSS pixels (tall, so that
    lazily loaded images load too)."""
    done = _browser(profile, height, "--dump-dom", _checker(page, height).as_uri())
    start = done.stdout.find('<pre id="report">')
    assert start >= 0, f"the browser produced no report (exit {done.returncode}): {done.stderr[-2000:]}"
    text = done.stdout[start + len('<pre id="report">'): done.stdout.index("</pre>", start)]
    return json.loads(unescape(text))


def screenshot(page, profile, height: int, path: Path) -> np.ndarray:
    """The first WIDTH x `height` pixels of `page` as a person sees them (laid out as in browser_report)."""
    done = _browser(profile, height, f"--screenshot={path}", _checker(page, height).as_uri())
    assert path.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


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
                "label_acc": 0.0 if failed else 1.0, "update_norm": 2.5 * server_round,
                "true_labels": labels.tolist()})  # as every attacked row has, failed ones too
    return out


def test_the_gallery_loads_in_a_browser_with_every_image(run_folder, tmp_path):
    page = write_gallery(run_folder)
    report = browser_report(page, tmp_path / "profile")

    assert report["title"] == f"fl-sim run {run_folder.name}"
    expected = sorted(str(p.relative_to(run_folder)) for p in run_folder.rglob("*.png"))
    assert len(expected) == 8  # 4 truths, 3 reconstructions (one attack failed), the plot by round
    assert "leakage-by-round.png" in expected
    assert sorted(set(image["src"] for image in report["images"])) == expected
    for image in report["images"]:
        with Image.open(run_folder / image["src"]) as png:
            assert image["width"] == png.width, image
    # every attacked client's 2 images are pairs: 4 batches of truths, 3 with their reconstructions
    assert len(report["pairs"]) == 8 and sum(len(pair["tiles"]) for pair in report["pairs"]) == 8 + 6
    assert "Round 1" in report["text"] and "Round 2" in report["text"] and "PSNR 31.5 dB" in report["text"]
    assert "update norm 5" in report["text"]  # round 2's update norm, 2.5 x 2
    assert report["scrollWidth"] <= report["clientWidth"]


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
    sources = set(sources[1:])
    assert len(sources) == 7 and all(re.fullmatch(r"round-\d{3}/client-\d{3}/(truth|reconstruction)\.png", s)
                                      for s in sources)
    assert escape("../../../etc/passwd") in html and escape("<i>why</i>") in html and "<b>loud</b>" not in html
    for client in ("../x", -1, 1.5):
        with pytest.raises((TypeError, ValueError)):
            client_folder(1, client)
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(run_folder, "round-001/../../elsewhere")


def test_recovered_pairs_are_marked_and_failed_attacks_are_counted(run_folder, tmp_path):
    rows = read_jsonl(run_folder / "metrics.jsonl")
    for row in rows:
        if row["status"] == "ok":
            row.update(psnr_images=[35.0, 12.0], recovered_at_30db=0.5, recovered_at_40db=0.0, label_share=0.5)
    rewrite_jsonl(run_folder / "metrics.jsonl", rows)
    report = browser_report(write_gallery(run_folder), tmp_path / "profile")
    recovered = [pair for pair in report["pairs"] if pair["recovered"]]
    assert len(recovered) == 3 and all(pair["caption"] == "\u2713 35" for pair in recovered)
    assert [pair["caption"] for pair in report["pairs"]].count("\u2717 12") == 3
    assert [pair["caption"] for pair in report["pairs"]].count("\u2014") == 2  # the failed attack's two images
    assert "image 1, label" in recovered[0]["title"] and "PSNR 35.0 dB" in recovered[0]["title"]
    text = report["text"]
    # round 2: one attack recovered an image, one failed (its images count as not recovered)
    assert ("2 client update(s): 2 attacked (1 with images recovered at \u2265 30 dB, 0 without, 1 failed), "
            "0 skipped (not read by the attack), 0 left out (faulty replies); images recovered: 25% at \u2265 30 dB"
            in text)
    assert "2 attacked (2 with images recovered at \u2265 30 dB, 0 without, 0 failed)" in text
    assert "failed (" + HOSTILE_STATUS in text


def gray(index: int) -> int:
    """The gray level of synthetic image `index`: neighbours differ, so a tile cut from the wrong place shows."""
    return 40 + (index * 37) % 200


def strip_png(levels: list[int], size: int = MNIST_SIZE, scale: int = 2) -> bytes:
    """A strip as save_images writes it: the images side by side, each `scale` times its size, here flat grays."""
    pixels = np.repeat(np.asarray(levels, dtype=np.uint8), size * scale)[None, :].repeat(size * scale, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_run(out: Path, rounds: int, clients: int, images: int, config: dict | None = None) -> Path:
    """The files of a finished run (run.json, global.jsonl, metrics.jsonl, strips), written directly: a run of
    a thousand clients costs seconds, not a federation. Image i of every batch is recovered exactly unless
    i % 3 == 2 (then the reconstruction is black, 5 dB)."""
    recovered = [i % 3 != 2 for i in range(images)]
    truth = strip_png([gray(i) for i in range(images)])
    reconstruction = strip_png([gray(i) if ok else 0 for i, ok in enumerate(recovered)])
    write_json(out / "run.json", {"config": {"dataset": "mnist", "model": "cnn", "num-clients": clients,
                                             "num-server-rounds": rounds, "train-mode": "epochs", "epochs": 2,
                                             "batch-size": 32, "local-steps": 1, "attack": "imprint",
                                             "iterations": 300, "min-shard": images, "max-shard": images,
                                             "max-attack-images": images, "defense": "none", **(config or {})},
                                  "seed": 0})
    psnrs = [100.0 if ok else 5.0 for ok in recovered]
    rows, global_rows = [], []
    for server_round in range(1, rounds + 1):
        global_rows.append({"round": server_round, "accuracy": 0.5 + 0.1 * server_round, "loss": 1.0})
        for client in range(clients):
            folder = out / client_folder(server_round, client)
            folder.mkdir(parents=True)
            (folder / "truth.png").write_bytes(truth)
            (folder / "reconstruction.png").write_bytes(reconstruction)
            rows.append({"round": server_round, "client": client, "status": "ok", "psnr": float(np.mean(psnrs)),
                         "ssim": 0.7, "mse": 0.01, "psnr_images": psnrs, "true_labels": [i % 10 for i in range(images)],
                         "labels": [i % 10 for i in range(images)], "label_share": 1.0, "update_norm": 1.0,
                         "recovered_at_30db": sum(recovered) / images, "recovered_at_40db": sum(recovered) / images})
    rewrite_jsonl(out / "global.jsonl", global_rows)
    rewrite_jsonl(out / "metrics.jsonl", rows)
    return out


def check_what_a_person_sees(report: dict, pairs: int) -> None:
    """Every pair is there, its tiles at least twice an MNIST digit's size, truth over reconstruction in one
    column; nothing overlaps its neighbour and nothing is wider than the 1400-px window."""
    assert len(report["pairs"]) == pairs
    assert report["scrollWidth"] <= report["clientWidth"] <= WIDTH, "the page scrolls sideways"
    for pair in report["pairs"]:
        (truth, reconstruction), box = pair["tiles"], pair["box"]
        assert truth[2] >= 2 * MNIST_SIZE and truth[3] >= 2 * MNIST_SIZE, pair
        assert reconstruction[0] == truth[0] and reconstruction[2] == truth[2] and reconstruction[1] > truth[1], pair
        assert box[0] + box[2] <= report["clientWidth"], pair
    for left, right in zip(report["pairs"], report["pairs"][1:], strict=False):
        if left["box"][1] == right["box"][1]:  # the same line of the grid
            assert left["box"][0] + left["box"][2] <= right["box"][0], (left, right)
        else:
            assert right["box"][1] >= left["box"][1] + left["box"][3], (left, right)
    assert all(image["width"] > 0 for image in report["images"]), "an image did not load"


def test_a_demo_sized_run_shows_every_image_as_a_tile_in_a_1400px_window(tmp_path):
    """make demo's shape (5 clients of 150 images) over 3 rounds: too many pairs for one page, so an overview and a
    page per round; on a round's page, every image a 56-px tile, cut from the right place of its strip."""
    out = synthetic_run(tmp_path / "demo", rounds=3, clients=5, images=150)
    overview = write_gallery(out)
    report = browser_report(overview, tmp_path / "profile", height=1400)
    pages = [f"round-{r:03d}/gallery.html" for r in (1, 2, 3)]
    assert [link for link in report["links"] if link in pages] == pages
    assert all((out / page).is_file() for page in pages) and not report["pairs"]
    assert "15 client update(s): 15 attacked (15 with images recovered at \u2265 30 dB" in report["text"]
    assert "images recovered: 67% at \u2265 30 dB" in report["text"]
    assert "local training: epochs: 2 pass(es)" in report["text"] and "iterations" not in report["text"]

    page = out / pages[0]
    report = browser_report(page, tmp_path / "profile")
    check_what_a_person_sees(report, 5 * 150)
    assert {"../gallery.html", "../round-002/gallery.html"} <= set(report["links"])
    for pair in report["pairs"][:150]:
        assert pair["recovered"] == (int(pair["title"].split(",")[0].split()[1]) % 3 != 0)

    pixels = screenshot(page, tmp_path / "profile", 1400, tmp_path / "round-1.png")
    seen = 0
    for pair in report["pairs"]:
        (truth, reconstruction), box = pair["tiles"], pair["box"]
        if reconstruction[1] + reconstruction[3] > 1400:
            break
        index = int(pair["title"].split(",")[0].split()[1]) - 1
        centre = lambda tile: pixels[int(tile[1] + tile[3] / 2), int(tile[0] + tile[2] / 2)]  # noqa: E731
        assert tuple(centre(truth)) == (gray(index),) * 3, pair
        assert tuple(centre(reconstruction)) == ((gray(index),) * 3 if index % 3 != 2 else (0, 0, 0)), pair
        frame = pixels[int(box[1] + box[3] / 2), int(box[0]) + 1]
        assert (frame[1] > 150 and frame[0] < 60) == pair["recovered"], (pair, frame)  # green, or not
        seen += 1
    assert seen >= 40  # the first screenful holds two rows of pairs at least


def test_a_thousand_client_run_is_split_into_small_pages(tmp_path):
    clients, images = 1000, 64
    out = synthetic_run(tmp_path / "big", rounds=2, clients=clients, images=images)
    overview = write_gallery(out)
    pages = sorted(out.glob("round-*/gallery*.html"))
    sizes = {page: page.stat().st_size for page in [overview, *pages]}
    assert max(sizes.values()) < 1_000_000, max(sizes.values())  # the bound is 5 MB; these are far smaller
    per_page = gallery.PAGE_IMAGES // images
    assert len(pages) == 2 * -(-clients // per_page)
    for server_round in (1, 2):
        shown = [int(n) for page in pages if page.parent.name == f"round-{server_round:03d}"
                 for n in re.findall(r"<h3>client (\d+)</h3>", page.read_text())]
        assert sorted(shown) == list(range(clients))  # each client once, on one page of its round
    for page in [overview, *pages]:
        for link in re.findall(r"href='([^']*)'", page.read_text()):
            assert (page.parent / link).is_file(), (page, link)
    assert len(re.findall(r"<tr><td>\d+</td>", overview.read_text())) == 2  # a line per round

    report = browser_report(pages[0], tmp_path / "profile")
    check_what_a_person_sees(report, per_page * images)
    assert report["text"].count("client update(s)") == 1 and "2000 attacked" not in report["text"]
    assert "1000 client update(s): 1000 attacked" in report["text"]  # the round's counts, on each of its pages


def test_the_plot_by_round_leads_with_images_recovered_and_shows_psnr_only_for_passive_attacks(tmp_path):
    from fl_sim.results.plots import plot_rounds
    from fl_sim.results.rows import metrics_row

    rows = [metrics_row("ok", round=r, client=0, psnr=30.0, psnr_images=[35.0, 10.0], true_labels=[1, 2],
                        label_share=1.0) for r in (1, 2)]
    rows += [metrics_row("skipped", round=2, client=1), metrics_row("rejected", round=2, client=2)]
    widths = {}
    for passive in (True, False):
        path = plot_rounds(rows, {1: 0.5, 2: 0.6}, tmp_path / f"{passive}.png", passive)
        with Image.open(path) as image:
            widths[passive] = image.width
    assert widths == {True: 5 * 400, False: 3 * 400}  # recovered, per client, accuracy (+ PSNR, labels)
    assert plot_rounds([], {}, tmp_path / "none.png") is None


def test_a_rebuild_redraws_only_the_pages_whose_rows_or_links_changed(tmp_path, monkeypatch):
    """A long run rebuilds its gallery every round: earlier rounds' pages are not drawn again, yet a page whose
    rows change (or whose round gains a neighbour) is."""
    out = synthetic_run(tmp_path / "run", rounds=3, clients=60, images=2)  # 60 clients: paged, 2 pages a round
    drawn: list[int] = []
    draw = gallery._client
    monkeypatch.setattr(gallery, "_client", lambda out, base, row: drawn.append(row.round) or draw(out, base, row))
    write_gallery(out)
    assert sorted(set(drawn)) == [1, 2, 3] and len(drawn) == 180
    drawn.clear()
    write_gallery(out)
    assert drawn == []  # nothing changed: no page drawn again
    rows = read_jsonl(out / "metrics.jsonl")
    rows[61].update(status="failed", reason="a reason drawn on round 2's page")  # round 2, client 1
    rewrite_jsonl(out / "metrics.jsonl", rows)
    drawn.clear()
    write_gallery(out)
    assert set(drawn) == {2} and len(drawn) == 60  # round 2's two pages (their heading counts the round's failures)
    assert "a reason drawn on round 2&#x27;s page" in (out / "round-002" / "gallery.html").read_text()
    (out / "round-002" / "gallery.html").unlink()  # a page deleted is drawn again
    drawn.clear()
    write_gallery(out)
    assert set(drawn) == {2} and len(drawn) == 50  # that page's 50 clients, not its round's other page
