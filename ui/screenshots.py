"""Screenshots of every tab of `xattn ui`, each after its button ran, into docs/ (Debian's Chromium via Playwright).

    python -m ui.screenshots [--out docs] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pipelines.loading import load_pipeline  # noqa: E402
from shapes.scenes import make_scene  # noqa: E402
from ui.app import UPLOAD_LIMIT, build_app  # noqa: E402

# (tab, button, the element that shows the result)
TABS = (
    ("Inspect", "#inspect-run", "#inspect-maps img"),
    ("Edit", "#edit-run", "#edit-result img"),
    ("Real image", "#real-run", "#real-result img"),
    ("Compose", "#compose-run", "#compose-result img"),
    ("Erase", "#erase-run", "#erase-file a"),
)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app = build_app(load_pipeline())
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, max_file_size=UPLOAD_LIMIT, quiet=True)
    scene = make_scene(7_000_002)
    photo = Path(tempfile.mkdtemp()) / "photo.png"
    Image.fromarray(scene.image).save(photo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(app.local_url)
            for tab, button, result in TABS:
                page.get_by_role("tab", name=tab).click()
                if tab == "Real image":
                    page.locator("#real-upload input[type=file]").set_input_files(str(photo))
                    page.locator("#real-caption textarea").fill(scene.caption)
                    page.locator("#real-target textarea").fill(scene.caption.replace("circle", "square", 1))
                page.locator(button).click()
                page.locator(result).first.wait_for(timeout=300_000)
                page.wait_for_timeout(500)
                path = args.out / f"ui-{tab.lower().replace(' ', '-')}.png"
                page.screenshot(path=str(path), full_page=True)
                print(path)
            browser.close()
    finally:
        app.close()


if __name__ == "__main__":
    main()
