"""Render an artifact's report.html to PNG in a headless browser (Chromium) and check the plots are
there as pixels, not only as markup: the rendered page must hold colored ink (plot markers, bars and
curves are colored; text, axes and grids are gray or black) that the same page rendered without its
inline SVGs lacks.

    python bench/render_report.py ARTIFACT [-o report.png] [--browser chromium]

Debian: `apt-get update && apt-get install -y chromium`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def render(page: Path, png: Path, browser: str, width: int = 1100, height: int = 3200) -> None:
    profile = tempfile.mkdtemp(prefix="optimize-chromium-")
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        f"--screenshot={png}",
        page.resolve().as_uri(),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def colored_pixels(png: Path, skip: int = 100) -> int:
    """Pixels below the title (its status is colored) with saturated color, the ink of plot markers,
    bars and curves: |R-G|, |G-B| or |R-B| above 60 (text, axes and grids are gray)."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    return sum(
        1
        for y in range(skip, height, 2)
        for x in range(0, width, 2)
        if max(
            abs(a - b)
            for a, b in (
                (pixels[x, y][0], pixels[x, y][1]),
                (pixels[x, y][1], pixels[x, y][2]),
                (pixels[x, y][0], pixels[x, y][2]),
            )
        )
        > 60
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path("report.png"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args()
    import re

    page = args.artifact / "report.html"
    text = page.read_text()
    svgs = text.count("<svg")
    render(page, args.out, args.browser)
    # The same page with its plots taken out: the colored ink must come from the plots.
    bare = Path(tempfile.mkdtemp(prefix="optimize-report-")) / "bare.html"
    bare.write_text(re.sub(r"<svg.*?</svg>", "", text, flags=re.S))
    render(bare, bare.with_suffix(".png"), args.browser)
    with_plots, without = colored_pixels(args.out), colored_pixels(bare.with_suffix(".png"))
    shutil.rmtree(bare.parent, ignore_errors=True)
    print(
        f"{args.out}: {svgs} inline plots; colored pixels (every 2nd row and column): "
        f"{with_plots} with them, {without} without"
    )
    # The tables mark verdicts in color too (green pass, red fail): the plots must add far more ink.
    if svgs == 0 or with_plots < 100 * svgs + without:
        sys.exit("the rendered page does not show its plots")


if __name__ == "__main__":
    main()
