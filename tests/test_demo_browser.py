"""The demo's page in real Chromium (Debian's, through chromedriver): a whole rotation.

Alice types `/rotate demo-app staging`; Bob approves the conversion, Carol the retirement
(through its confirm dialog); the checklist, the thread, the 2nd line channel, App Home and the
login counter are checked on the page. Screenshots go to build/screenshots/.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from demo import page
from demo.world import World
from tests.rig import REPO

SHOTS = REPO / "build" / "screenshots"


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("needs Debian's chromium and chromium-driver (.ci/run installs them)",
                    pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1500,1000"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path / "world") as w:
        page.attach(w)
        yield w


def _until(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except Exception:  # the page re-renders under us: try again
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_whole_rotation_on_the_page(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    SHOTS.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        browser.save_screenshot(str(SHOTS / f"{name}.png"))

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def as_user(user: str) -> None:
        Select(browser.find_element(By.ID, "user")).select_by_value(user)

    def click(what: str, find: Callable[[], Any]) -> None:
        """Find and click; a re-render between the two means: find it again."""
        def attempt() -> bool:
            element = find()
            if element is None:
                return False
            element.click()
            return True
        _until(what, attempt)

    def press(action: str, label: str) -> None:
        def find() -> Any:
            for button in browser.find_elements(By.CSS_SELECTOR,
                                                f"#thread button[data-action='{action}']"):
                if button.text == label:
                    return button
            return None
        click(f"a {label} button", find)

    browser.get(world.slack.page_url)
    _until("the page", lambda: browser.find_element(By.ID, "text").get_attribute("value"))
    _until("logins", lambda: int(text("logins-ok")) > 0)
    composer = browser.find_element(By.ID, "text")
    assert composer.get_attribute("value") == "/rotate demo-app staging"
    browser.find_element(By.CSS_SELECTOR, "#composer button").click()
    _until("the root message", lambda: "Rotation #1: demo-app in staging" in text("history"))
    _until("the convert approval", lambda: "Approve" in text("thread"))
    shot("1-asked-to-approve")

    as_user("U0BOB")
    press("approve", "Approve")
    _until("the retire approval", lambda: "Retire demo-app in staging" in text("thread")
           and "Approved by @Bob" in text("thread"), timeout=180)
    as_user("U0CAROL")
    _until("Carol's view", lambda: "Approve" in text("thread"))
    press("approve", "Approve")
    dialog = _until("the confirm dialog",
                    lambda: browser.find_element(By.ID, "dialog").is_displayed()
                    and browser.find_element(By.ID, "dialog"))
    assert "retire" in dialog.text.lower() or "drop" in dialog.text.lower(), dialog.text
    shot("2-confirm-destructive")
    browser.find_element(By.ID, "dialog-yes").click()

    _until("the rotation to finish", lambda: "is done" in text("thread"), timeout=180)
    _until("the checklist", lambda: "9/9 done" in text("history"))
    shot("3-done")
    assert int(text("logins-failed")) == 0, text("counter")
    assert "demo-app-user-" in text("counter")

    click("#govuk-2ndline", lambda: browser.find_element(
        By.XPATH, "//nav//div[text()='#govuk-2ndline']"))
    _until("the 2nd line notice", lambda: "about to run" in text("history"))
    shot("4-second-line")
    click("App Home", lambda: browser.find_element(By.ID, "home-item"))
    _until("App Home", lambda: "Opening App Home" not in text("history")
           and text("history").strip())
    shot("5-app-home")
    assert int(text("logins-failed")) == 0
