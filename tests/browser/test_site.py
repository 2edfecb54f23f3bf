"""The built website, page by page, in headless Chromium with no network and no kernel.

For every page of _toc.yml: no JavaScript error in the console and no request leaving the site;
every widget renders and every image loads; every figure of the notebook made it into the page; moving each backfill slider changes the figure shown;
the Colab launch button opens the chapter's notebook on the main branch, and the repository and
issue buttons are there; nothing is wider than a
390 px phone screen. A screenshot of each page at desktop and phone width is saved for people to
look at (_build/screenshots/<page>-desktop.png, -phone.png).
"""

from __future__ import annotations

import base64
import re
import time

import nbformat
import pytest
from bs4 import BeautifulSoup
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from .book_site import DESKTOP, PHONE, ROOT, book_config, toc_files

PAGES = toc_files()
NOTEBOOKS = [p for p in PAGES if (ROOT / f"{p}.ipynb").is_file()]
MAX_SCREENSHOT_HEIGHT = 40000  # px: cuts off only the very longest pages

# State of the page's widgets: each widget-view <script> placeholder gets a rendered
# <div class="widget-subarea"> inserted before it by @jupyter-widgets/html-manager.
WIDGET_STATE_JS = """
const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
const rendered = views.map(s => s.previousElementSibling)
    .filter(d => d && d.classList.contains('widget-subarea') && d.childElementCount > 0);
const images = [...document.querySelectorAll('.bd-article img')];
return {views: views.length, rendered: rendered.length,
        sizes: rendered.map(d => [d.getBoundingClientRect().width, d.getBoundingClientRect().height]),
        images_pending: images.filter(i => !i.complete).length};
"""


def page_name(page: str) -> str:
    return page.split("/")[-1]


_NEVER_RENDERED: set[str] = set()  # pages whose widgets timed out once: don't wait again


def open_page(driver, base_url: str, page: str, metrics: dict) -> list[dict]:
    """Load ``page`` at the given screen size, wait until its widgets, images and maths are done,
    and return the browser console entries logged meanwhile."""
    driver.get_log("browser")  # drop entries of earlier pages
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    driver.get(f"{base_url}{page}.html")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
    state = {}

    def widgets_done(d):
        state.update(d.execute_script(WIDGET_STATE_JS))
        return state["rendered"] == state["views"] and state["images_pending"] == 0

    try:  # rendering takes a few seconds; a page whose widget JavaScript is broken never finishes
        WebDriverWait(driver, 5 if page in _NEVER_RENDERED else 60, poll_frequency=0.25).until(widgets_done)
    except TimeoutException:  # test_widgets_render reports it; the other checks still run
        _NEVER_RENDERED.add(page)
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const mj = window.MathJax;
        if (mj && mj.startup && mj.startup.promise) mj.startup.promise.then(() => done(true), () => done(false));
        else done(true);""")
    time.sleep(0.3)  # let the last layout settle before measuring
    return driver.get_log("browser")


def save_screenshot(driver, path, metrics: dict) -> None:
    """Full-page PNG (up to MAX_SCREENSHOT_HEIGHT px tall): the screen is made as tall as the page
    for the shot (Chromium's capture-beyond-viewport renders long pages shifted at random)."""
    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    tall = int(min(max(height, metrics["height"]), MAX_SCREENSHOT_HEIGHT))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", dict(metrics, height=tall))
    try:
        time.sleep(0.5)
        # On a taller screen the page may get shorter (boxes sized to the screen height).
        height = driver.execute_script("return document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": metrics["width"], "height": min(height, tall), "scale": 1}
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip})
        path.write_bytes(base64.b64decode(shot["data"]))
    finally:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def errors_in(log: list[dict]) -> list[str]:
    return [entry["message"] for entry in log if entry["level"] == "SEVERE"]


def outside_requests(driver, base_url: str) -> list[str]:
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => !n.startsWith(arguments[0]) && !n.startsWith('data:'))", base_url)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_desktop_page_has_no_errors(driver, base_url, screenshot_dir, page):
    log = open_page(driver, base_url, page, DESKTOP)
    save_screenshot(driver, screenshot_dir / f"{page_name(page)}-desktop.png", DESKTOP)
    assert not errors_in(log), f"{page}: console errors:\n" + "\n".join(errors_in(log))
    assert not outside_requests(driver, base_url), \
        f"{page} loads files from outside the site (CDN?): {outside_requests(driver, base_url)}"
    assert driver.find_elements("css selector", ".bd-article h1"), f"{page} has no title"
    repo = book_config()["repository"]["url"].rstrip("/")
    links = driver.execute_script("return [...document.querySelectorAll('.article-header-buttons a')].map(a => a.href)")
    assert repo in links, f"{page}: no repository button linking to {repo}"
    assert any(h.startswith(f"{repo}/issues/new") for h in links), f"{page}: no 'open an issue' button"


@pytest.mark.parametrize("page", PAGES)
def test_widgets_render(driver, base_url, page):
    open_page(driver, base_url, page, DESKTOP)
    state = driver.execute_script(WIDGET_STATE_JS)
    broken = driver.execute_script(
        "return [...document.querySelectorAll('.bd-article img')].filter(i => !(i.naturalWidth > 0))"
        ".map(i => i.src.slice(0, 80))")
    assert not broken, f"{page}: images that did not load: {broken}"
    if not state["views"]:
        pytest.skip(f"{page} has no widgets")
    assert state["rendered"] == state["views"], \
        f"{page}: {state['rendered']} of {state['views']} widgets rendered (widget JavaScript not loaded?)"
    assert all(w > 0 and h > 0 for w, h in state["sizes"]), f"{page}: a widget has zero size: {state['sizes']}"


@pytest.mark.parametrize("page", NOTEBOOKS)
def test_every_figure_is_on_the_page(site_dir, page):
    """Each code cell that ends in ``plt.show()`` has a figure in the built page (a kernel with a
    non-inline matplotlib backend, e.g. MPLBACKEND=Agg, would drop them all silently)."""
    notebook = nbformat.read(ROOT / f"{page}.ipynb", as_version=4)
    shown = [c for c in notebook.cells if c.cell_type == "code" and "plt.show()" in c.source
             and "remove-cell" not in c.metadata.get("tags", []) and "remove-output" not in c.metadata.get("tags", [])]
    html = BeautifulSoup((site_dir / f"{page}.html").read_text(), "html.parser")
    with_figure = [cell for cell in html.select("div.cell")
                   if any(not img.find_parent(class_="widget-subarea") for img in cell.select(".cell_output img"))]
    assert len(with_figure) >= len(shown), \
        f"{page}: {len(shown)} cells call plt.show() but only {len(with_figure)} figures are on the page"


# For every .backfill-slider: its frames (the .backfill-frames Tab in the same box), which frame
# is visible, the slider's readout, and the visible frame's image.
SLIDER_JS = """
return [...document.querySelectorAll('.backfill-slider')].map(slider => {
  const box = slider.parentElement;
  const frames = box ? box.querySelector('.backfill-frames') : null;
  const images = frames ? [...frames.querySelectorAll('img')] : [];
  const visible = images.map((img, i) => [img, i]).filter(([img]) => img.offsetParent !== null);
  return {n: images.length, visible: visible.map(([, i]) => i),
          src: visible.length ? visible[0][0].src : null,
          readout: (slider.querySelector('.widget-readout') || {}).textContent};
});
"""


@pytest.mark.parametrize("page", PAGES)
def test_backfill_sliders_change_the_figure(driver, base_url, page):
    open_page(driver, base_url, page, DESKTOP)
    sliders = driver.find_elements("css selector", ".backfill-slider")
    if not sliders:
        pytest.skip(f"{page} has no backfill slider")
    for k, slider in enumerate(sliders):
        start = driver.execute_script(SLIDER_JS)[k]
        assert start["n"] >= 2, f"{page}: slider {k} has {start['n']} frames (needs a .backfill-frames Tab next to it)"
        assert start["visible"] == [0], f"{page}: slider {k} starts showing frames {start['visible']}, expected [0]"
        handle = slider.find_element("css selector", ".noUi-handle")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", handle)
        for step in range(1, start["n"]):
            handle.send_keys(Keys.ARROW_RIGHT)
            WebDriverWait(driver, 10, poll_frequency=0.1).until(
                lambda d: d.execute_script(SLIDER_JS)[k]["visible"] == [step],
                f"{page}: slider {k} moved to position {step} but the frame shown did not follow")
        end = driver.execute_script(SLIDER_JS)[k]
        assert end["src"] != start["src"], f"{page}: slider {k} moved from first to last but the figure stayed the same"
        assert end["readout"] != start["readout"], f"{page}: slider {k}'s readout did not change"


@pytest.mark.parametrize("page", NOTEBOOKS)
def test_colab_button_opens_this_notebook_on_main(driver, base_url, page):
    repo = book_config()["repository"]
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repo["url"])
    assert m, f"repository.url in _config.yml is not https://github.com/ORG/REPO: {repo['url']}"
    assert repo.get("branch") == "main", f"repository.branch in _config.yml is {repo.get('branch')!r}, not main"
    expected = f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/main/{page}.ipynb"
    open_page(driver, base_url, page, DESKTOP)
    links = driver.execute_script(
        "return [...document.querySelectorAll('.dropdown-launch-buttons a, a.btn')].map(a => a.href)"
        ".filter(h => h.includes('colab.research.google.com'))")
    assert links == [expected], f"{page}: Colab launch links {links}, expected [{expected}]"


# Every image, table, figure and widget of the article must fit the screen: either itself, or
# inside a box that scrolls horizontally and fits (wide tables, code).
OVERFLOW_JS = """
const vw = arguments[0];
const article = document.querySelector('.bd-article');
const clipper = el => {
  for (let p = el.parentElement; p && p !== article; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if (o === 'auto' || o === 'scroll' || o === 'hidden') return p;
  }
  return null;
};
const out = [];
for (const el of article.querySelectorAll('img, table, figure, svg, .widget-subarea, .cell_output')) {
  if (el.offsetParent === null && el.tagName !== 'svg') continue;  // hidden (e.g. other frames)
  const box = clipper(el) || el;
  const r = box.getBoundingClientRect();
  if (r.width === 0) continue;
  if (r.left < -1 || r.right > vw + 1) {
    out.push(`${el.tagName.toLowerCase()}.${[...el.classList].join('.')} spans ${Math.round(r.left)}..${Math.round(r.right)} px`);
  }
}
return {inner_width: window.innerWidth, scroll_width: document.documentElement.scrollWidth, overflowing: out};
"""


@pytest.mark.parametrize("page", PAGES)
def test_phone_width(driver, base_url, screenshot_dir, page):
    log = open_page(driver, base_url, page, PHONE)
    width = PHONE["width"]
    result = driver.execute_script(OVERFLOW_JS, width)
    save_screenshot(driver, screenshot_dir / f"{page_name(page)}-phone.png", PHONE)
    assert not errors_in(log), f"{page} at phone width: console errors:\n" + "\n".join(errors_in(log))
    assert not result["overflowing"], f"{page}: wider than a {width} px phone: {result['overflowing']}"
    # A mobile browser widens the layout to the widest element, then the page scrolls sideways.
    assert result["inner_width"] == width and result["scroll_width"] <= width, \
        f"{page} is {max(result['inner_width'], result['scroll_width'])} px wide on a {width} px phone"
