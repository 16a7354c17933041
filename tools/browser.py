"""Headless Chromium for the atlas's browser tests and benchmark (Debian's chromium + chromedriver).

Nothing is downloaded: selenium drives the system's ``chromium`` through the system's
``chromedriver``. The flags keep the browser off the network and out of the user's profile.
"""
from __future__ import annotations

import shutil
import tempfile

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900")


class NoBrowser(RuntimeError):
    """Chromium or its driver is not installed; the message says how to install them."""


def headless_chromium():
    """A selenium driver of a fresh headless Chromium (own temporary profile, deleted by its
    ``quit()``); quit() it after."""
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chrome or not driver:
        raise NoBrowser("Debian's chromium and chromium-driver are not installed "
                        "(apt-get install -y chromium chromium-driver; .ci/run does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="atlas-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    try:
        browser = webdriver.Chrome(service=Service(driver), options=options)
    except Exception:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    close = browser.quit

    def quit_and_clean() -> None:
        """Close the browser, then delete its temporary profile (else one is left per test)."""
        try:
            close()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    browser.quit = quit_and_clean
    return browser


def wait_ready(driver, timeout: float = 30) -> None:
    """Wait until an atlas page's script marks the body ready (cards drawn, plot made)."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
