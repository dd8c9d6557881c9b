"""Headless Chromium for the dashboard tests: the system's ``chromium`` driven by its ``chromedriver``.

Selenium is pointed at both binaries explicitly, so it never downloads a
browser or a driver. ``.ci/run`` installs them (``apt-get install chromium
chromium-driver``) when they are missing.
"""

from __future__ import annotations

import os
import shutil

#: Where the tests save what a person may want to look at (screenshots); kept out of git.
ARTIFACTS = os.environ.get("ROUTILUX_MP_ARTIFACTS",
                           os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts"))
#: Seconds for a page to load, or for what a test waits to see on it.
PAGE_TIMEOUT = 30.0


def binaries() -> tuple[str, str]:
    """The system's chromium and chromedriver; a clear failure when they are not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise AssertionError("the dashboard's browser tests need the system's Chromium and its driver: "
                             "apt-get install -y chromium chromium-driver (.ci/run installs them when missing)")
    return browser, driver


def start_browser(width: int = 1400, height: int = 1100):
    """A headless Chromium (quit it at the end of the test: it is a child process of the test)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(PAGE_TIMEOUT)
    return chrome


def save_screenshot(chrome, name: str) -> str:
    """Save the whole page as ``test-artifacts/NAME`` (or ``$ROUTILUX_MP_ARTIFACTS``); return its path."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    height = chrome.execute_script("return document.documentElement.scrollHeight")
    chrome.set_window_size(1400, max(int(height) + 40, 800))
    chrome.save_screenshot(path)
    return path
