"""Browser tests of the built website: ``pytest tests/browser --site _build/html``.

They need the built book, so the unit-test run (``pytest tests``) does not collect them; the
README's test command runs them after the build (scripts/test.sh). The site is served on
127.0.0.1 and opened in headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/install_browser.sh) with every other host unresolvable: the pages must work with no
network and no kernel. Screenshots go to ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--site", default=None, help="built website to test, e.g. _build/html")
    parser.addoption("--screenshots", default=None,
                     help="folder for the screenshots (default: screenshots/ next to the site folder)")


def pytest_ignore_collect(collection_path, config):
    # Without --site (e.g. in the unit-test run) these tests are not collected at all.
    if not config.getoption("site", default=None) and collection_path.suffix == ".py":
        return True
    return None


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch):
    """Overrides the unit tests' fixture of the same name (tests/conftest.py), which refuses every
    internet socket: here the test talks to chromedriver and to the site server on loopback, and
    to nothing else."""
    real_connect = socket.socket.connect

    def loopback_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a browser test tried to open a network connection to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture(scope="session")
def site_dir(pytestconfig) -> Path:
    site = Path(pytestconfig.getoption("site")).resolve()
    if not (site / "index.html").is_file():
        pytest.fail(f"{site}/index.html does not exist: build the book first (bash scripts/build_book.sh)")
    return site


@pytest.fixture(scope="session")
def screenshot_dir(pytestconfig, site_dir) -> Path:
    folder = Path(pytestconfig.getoption("screenshots") or site_dir.parent / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the browser closing a connection early is not a test failure


@pytest.fixture(scope="session")
def base_url(site_dir):
    """The site served by Python's http.server on 127.0.0.1, on a free port."""
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _executable(env: str, *names: str) -> str:
    for candidate in (os.environ.get(env), *names):
        if candidate and (path := shutil.which(candidate)):
            return path
    pytest.fail(f"{names[0]} not found: run scripts/install_browser.sh (or set {env})")


@pytest.fixture(scope="session")
def driver(tmp_path_factory, base_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _executable("CHROMIUM", "chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--force-color-profile=srgb",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                # No network but the site: a page that needs a CDN fails here as it would offline.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(_executable("CHROMEDRIVER", "chromedriver"))
    browser = webdriver.Chrome(service=service, options=options)
    browser.set_page_load_timeout(120)
    browser.set_script_timeout(120)
    yield browser
    browser.quit()
