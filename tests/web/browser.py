"""Debian's Chromium, headless, driven through chromedriver (selenium), for the console's
browser tests; screenshots go to ``tests/artifacts/console/`` (or ``$DICOM_AI_ARTIFACTS``).

The browser runs with a profile of its own in a temporary folder, nothing fetched from the
network (no component updates, sync or background networking), and its console log kept:
`Browser.problems` lists what the page logged as an error (a CSP violation, a failed load).
"""

from __future__ import annotations

import base64
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.markers import uses
from tests.peers import REPO

__all__ = ["ARTIFACTS", "Browser"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("DICOM_AI_ARTIFACTS", REPO / "tests" / "artifacts")) / "console"

T = TypeVar("T")


def artifacts_dir() -> Path:
    """The screenshots' folder, kept out of git (a ``.gitignore`` of ``*`` in its parent)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# test artifacts (screenshots), written by the tests\n*\n")
    return ARTIFACTS


class Browser:
    """One headless Chromium at ``base_url`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, base_url: str, width: int = 1400, height: int = 1000) -> None:
        uses("browser", "chromium")
        self.base_url = base_url.rstrip("/")
        self._profile = tempfile.TemporaryDirectory(prefix="dicom-ai-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--password-store=basic",
            f"--window-size={width},{height}",
            f"--user-data-dir={self._profile.name}",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(60)
        self.shots: list[Path] = []
        self._problems: list[str] = []
        self._allowed: list[str] = []

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._profile.cleanup()

    # -- pages -------------------------------------------------------------------------------

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    @property
    def path(self) -> str:
        url = str(self.driver.current_url)
        return url[len(self.base_url) :] if url.startswith(self.base_url) else url

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def has(self, css: str) -> bool:
        return bool(self.find_all(css))

    def text(self, css: str) -> str:
        """The text of the element, read again each time (live parts are swapped)."""
        for _ in range(5):
            try:
                return str(self.find(css).text)
            except WebDriverException as exc:
                if not _gone(exc):
                    raise
                time.sleep(0.1)
        return str(self.find(css).text)

    def page_text(self) -> str:
        return self.text("body")

    def fill(self, css: str, value: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(value)

    def set_value(self, css: str, value: str) -> None:
        """Set a field's value at once (a long text, where typing would take long)."""
        self.driver.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            self.find(css),
            value,
        )

    def click(self, css: str) -> None:
        """Click, again if a live refresh swapped the element between finding and clicking."""
        for attempt in range(5):
            try:
                self.find(css).click()
                return
            except WebDriverException as exc:
                if attempt == 4 or not _gone(exc):
                    raise
                time.sleep(0.2)

    def submit(self, css: str) -> None:
        """Click a submit button and wait for the page it leads to."""
        old = self.find("html")
        self.click(css)
        WebDriverWait(self.driver, 60).until(lambda _: _stale(old))
        self.wait_loaded()

    def wait_loaded(self) -> None:
        WebDriverWait(self.driver, 60).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """Wait for ``predicate`` to return something true (elements may be swapped under
        it: a vanished or stale one counts as not yet)."""
        found: list[T] = []

        def ready(_: object) -> bool:
            try:
                result = predicate()
            except WebDriverException as exc:
                if _gone(exc):
                    return False
                raise
            if result:
                found[:] = [result]
            return bool(result)

        try:
            WebDriverWait(
                self.driver,
                timeout,
                poll_frequency=0.25,
                ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
            ).until(ready)
        except TimeoutException:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}") from None
        return found[0]

    # -- logging in --------------------------------------------------------------------------

    def login(self, user: str, password: str) -> None:
        self.driver.delete_all_cookies()
        self.open("/login")
        self.fill("#user", user)
        self.fill("#password", password)
        self.submit("#login")

    # -- screenshots and the browser's log ---------------------------------------------------

    def screenshot(self, name: str) -> Path:
        """The whole page (beyond the window's height) as ``<artifacts>/<name>.png``."""
        metrics: dict[str, Any] = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": min(size["height"], 6000),
                    "scale": 1,
                },
            },
        )
        path = artifacts_dir() / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        self.shots.append(path)
        return path

    def allow(self, path: str, status: int) -> None:
        """A page a test expects to answer ``status`` (its refusal is logged as an error)."""
        self._allowed.append(
            f"{self.base_url}{path} - Failed to load resource: the server responded with a "
            f"status of {status} "
        )

    def problems(self) -> list[str]:
        """What the pages logged as errors so far (CSP violations, failed loads, scripts),
        but for the statuses a test expected (`allow`)."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        for entry in entries:
            message = str(entry.get("message", ""))
            if entry.get("level") == "SEVERE" and not message.startswith(tuple(self._allowed)):
                self._problems.append(message)
        return list(self._problems)


def _gone(exc: WebDriverException) -> bool:
    """An element a live refresh or a navigation took out of the page: Chromium says so as
    a stale reference, or, caught in the middle, as a node that "does not belong to the
    document"."""
    return isinstance(exc, StaleElementReferenceException) or (
        "does not belong to the document" in str(exc.msg or exc)
    )


def _stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except WebDriverException as exc:
        if _gone(exc):
            return True
        raise
    return False
