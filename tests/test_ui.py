"""The Gradio app, launched for real: every tab's endpoint through gradio_client, and the Inspect tab in a
headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

import base64
import io
import os
import shutil
import tempfile
from pathlib import Path

import httpx

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402

from pipelines.erasure import read_metadata  # noqa: E402
from pipelines.loading import load_pipeline  # noqa: E402
from shapes.judge import match_caption, read_objects  # noqa: E402
from shapes.scenes import make_scene  # noqa: E402
from ui.app import UPLOAD_LIMIT, build_app  # noqa: E402
from xattn.heatmap import LABEL_HEIGHT  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served():
    app = build_app(load_pipeline(None))
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, max_file_size=UPLOAD_LIMIT, quiet=True)
    yield app.local_url
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served, verbose=False)


def picture(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tile(path, index: int, side: int) -> np.ndarray:
    """Tile `index` of a one-row grid of `side`-pixel tiles, back at the model's 64 px."""
    sheet = picture(path)
    assert sheet.shape[0] == side + LABEL_HEIGHT  # the tiles and their caption strip
    step = side // 64
    return sheet[:side, index * side : (index + 1) * side][::step, ::step]


def test_inspect_returns_the_image_and_a_captioned_map_per_word(client):
    image, gallery = client.predict("a red circle and a blue square", 0, 10, 5.0, [16, 8, 4], 1, 10, api_name="/inspect")
    assert [item["caption"] for item in gallery] == ["a", "red", "circle", "and", "a#2", "blue", "square"]
    assert picture(image).shape == (256, 256, 3)
    assert picture(gallery[0]["image"]).shape == (256, 256, 3)
    with pytest.raises(Exception, match="step range must lie within 1..10"):
        client.predict("a red circle", 0, 10, 5.0, [16], 8, 12, api_name="/inspect")


def test_edit_swaps_the_word_and_reports_the_edit(client):
    sheet, gallery, note = client.predict("a red circle", "a red square", "auto", "", "0.8", "0.4", 3, 25, 5.0,
                                          *([1.0] * 12), api_name="/edit")
    assert note == "edit: replace (word swap)"
    assert [item["caption"] for item in gallery] == ["source: a", "source: red", "source: circle", "target: a", "target: red", "target: square"]
    assert match_caption(tile(sheet, 0, 256), "a red circle").ok and match_caption(tile(sheet, 1, 256), "a red square").ok
    with pytest.raises(Exception, match="swap"):
        client.predict("a red circle", "a big red square", "replace", "", "0.8", "0.4", 0, 5, 5.0, *([1.0] * 12), api_name="/edit")


def test_real_image_is_inverted_and_edited(client, tmp_path):
    scene = make_scene(7_000_002)
    path = tmp_path / "photo.png"
    Image.fromarray(scene.image).save(path)
    sheet, gallery, note = client.predict(handle_file(str(path)), scene.caption, "direct", "", scene.caption.replace("circle", "square", 1),
                                          "auto", "", "0.8", "0.4", 25, 5.0, *([1.0] * 12), api_name="/real_image")
    target = scene.caption.replace("circle", "square", 1)
    source = ["a", "blue", "circle", "above", "a#2", "yellow", "circle#2"]
    edited = ["a", "blue", "square", "above", "a#2", "yellow", "circle"]
    assert note == "edit: replace (word swap)"
    assert [item["caption"] for item in gallery] == [f"source: {w}" for w in source] + [f"target: {w}" for w in edited]
    assert picture(sheet).shape[1] == 3 * 256
    read = {o.colour: o for o in read_objects(tile(sheet, 2, 256))}
    # The word was swapped: the blue circle is gone. (Its square comes out cut by the top border here, a drawing the
    # judge rejects since issue 29, so the target caption is not read exactly.)
    assert read["yellow"].shape == "circle" and read["blue"].shape != "circle"
    with pytest.raises(Exception, match="upload an image first"):
        client.predict(None, "a red circle", "direct", "", "a red square", "auto", "", "0.8", "0.4", 5, 5.0, *([1.0] * 12),
                       api_name="/real_image")
    with pytest.raises(Exception, match="dpl learns the caption's object nouns: name them"):
        client.predict(handle_file(str(path)), scene.caption, "dpl", "", target, "auto", "", "0.8", "0.4", 5, 5.0, *([1.0] * 12),
                       api_name="/real_image")
    sheet, _, note = client.predict(handle_file(str(path)), scene.caption, "dpl-direct", "circle", target, "auto", "", "0.8", "0.4", 5,
                                    5.0, *([1.0] * 12), api_name="/real_image")
    assert note == "edit: replace (word swap)" and picture(sheet).shape[1] == 3 * 256
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1900, 1900, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 8_000_000
    with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
        client.predict(handle_file(str(big)), "a red circle", "direct", "", "a red square", "auto", "", "0.8", "0.4", 5, 5.0,
                       *([1.0] * 12), api_name="/real_image")


def test_compose_shows_plain_and_guided_with_concept_maps(client):
    sheet, gallery = client.predict("a red circle and a blue square", ["circle", "square"], "astar", 2, 10, 5.0, api_name="/compose")
    assert [item["caption"] for item in gallery] == ["circle", "square"]
    assert picture(sheet).shape == (256 + LABEL_HEIGHT, 2 * 256, 3)
    with pytest.raises(Exception, match="tick at least one concept"):
        client.predict("a red circle", [], "astar", 0, 5, 5.0, api_name="/compose")


def call_raw(url: str, endpoint: str, data: list) -> str:
    """An API call over plain HTTP, as any script could send it: the event stream's text (or the refusal)."""
    posted = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=60)
    if posted.status_code != 200:
        return f"HTTP {posted.status_code}"
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{posted.json()['event_id']}", timeout=300) as stream:
        return "".join(stream.iter_text())


def data_url(raw: bytes) -> dict:
    return {"url": "data:image/png;base64," + base64.b64encode(raw).decode(), "meta": {"_type": "gradio.FileData"}}


def test_inline_images_hold_the_upload_limit_in_bytes_and_pixels(served):
    from benchmarks.hostile_input import png_header

    rest = ["a red circle", "direct", "", "a red square", "auto", "", "0.8", "0.4", 3, 5.0] + [1.0] * 12
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1900, 1900, 3), dtype=np.uint8)).save(noise, "PNG")
    assert noise.tell() > 8_000_000
    assert "the image is over the app's 8mb limit; send a smaller file" in call_raw(served, "real_image", [data_url(noise.getvalue())] + rest)
    bomb = call_raw(served, "real_image", [data_url(png_header(100_000, 100_000))] + rest)
    assert "more than the 50 megapixels xattn reads; it was not decoded" in bomb


def test_only_the_tabs_are_endpoints(served):
    endpoints = Client(served, verbose=False).view_api(return_format="dict", print_info=False)
    assert list(endpoints["named_endpoints"]) == ["/inspect", "/edit", "/real_image", "/compose", "/erase"]
    assert not endpoints["unnamed_endpoints"]
    assert call_raw(served, "false", ["a red circle"]).startswith("HTTP ")


def test_erase_gives_before_after_and_the_file(client):
    made_before = set(Path(tempfile.gettempdir()).glob("xattn-erase-*"))
    before, after, path = client.predict("circle", "uce", "square", "square,triangle", 0, "a red circle; a blue circle", 0,
                                         api_name="/erase")
    assert read_metadata(path)["method"] == "uce"
    for i in range(2):
        assert "circle" in [o.shape for o in read_objects(tile(before, i, 128))]
        assert "circle" not in [o.shape for o in read_objects(tile(after, i, 128))]
    with pytest.raises(Exception, match="not a word of the tokenizer's vocabulary"):
        client.predict("zxqvw", "uce", "", "", 0, "", 0, api_name="/erase")
    assert set(Path(tempfile.gettempdir()).glob("xattn-erase-*")) == made_before  # no folder left per call


def test_long_work_reports_progress_per_step(client):
    import time

    job = client.submit("circle", "esd-x", "square", "", 40, "a red circle", 0, api_name="/erase")
    seen = []
    while not job.done():
        progress = job.status().progress_data
        if progress:
            seen.extend((unit.index, unit.length, unit.unit) for unit in progress if unit.length)
        time.sleep(0.2)
    job.result()
    training = [(index, length) for index, length, unit in seen if length == 40]
    assert len({index for index, _ in training}) >= 3  # the trainer's bar, one tick per step, reached the page


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")
def test_a_browser_generates_and_sees_the_heat_maps(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(served)
            box = page.locator("#inspect-prompt textarea")
            box.fill("a green triangle and a red circle")
            page.locator("#inspect-run").click()
            page.locator("#inspect-maps img").nth(5).wait_for(timeout=120_000)
            captions = page.locator("#inspect-maps .caption-label, #inspect-maps figcaption").all_inner_texts()
            assert page.locator("#inspect-image img").count() == 1
            assert page.locator("#inspect-maps img").count() >= 6 and any("triangle" in c for c in captions)
        finally:
            browser.close()


def test_xattn_ui_serves_on_localhost(tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ui.cli", "ui", "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and "xattn" in page.read().decode()
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "xattn ui did not come up"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(30)
