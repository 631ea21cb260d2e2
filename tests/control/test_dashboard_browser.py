"""The admin dashboard in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): log in through the form, see the app a fake agent
serves, see hostile strings rendered as text with no script run, log out.

The hostile strings are the free text a client or an agent's history can put on the pages: a
node's status reason (``POST /v1/nodes/{id}/status``; the ledger takes any text) and an audit
row whose every free field is markup (written to the store directly: today's tunnel parser
admits no markup in a repo or tag, but the page must not rely on it). One browser session
serves every step, to keep the test short. ``EE_DASHBOARD_SCREENSHOT=<path>`` saves a
screenshot of the app page there (README's docs/dashboard.png).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from eecp.dev import pki as devpki
from tests.control.test_dashboard import XSS, hostile_audit_row
from tests.harness import FakeAgent, running_agent
from tests.ledgerkit import ADMIN, key, open_ledger_plane

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def driver() -> Any:
    """A headless Chromium (skips, with the reason, when it or selenium is missing)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium or chromedriver is not installed (apt-get install chromium "
                    "chromium-driver): the dashboard's browser test needs them")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (the test extras)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,900", "--no-first-run"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


def assert_inert(browser: Any, table: str) -> None:
    """The XSS payload is in ``table`` as text, and nothing of it ran or became an element."""
    from selenium.webdriver.common.by import By

    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, f"#{table} td")]
    assert XSS in cells, cells
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert browser.execute_script(
        f"return document.querySelectorAll('#{table} script, #{table} img').length") == 0
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in browser.page_source


def walk_through(browser: Any, url: str, agent_id: str, screenshot: str | None) -> None:
    """Every step, in one browser session (blocking: run in a thread)."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def arrived(path: str) -> None:
        # a click's navigation (a form's POST, its redirect) completes after click() returns
        WebDriverWait(browser, 10).until(expected_conditions.url_to_be(url + path))

    browser.get(url + "/admin")
    assert browser.current_url == url + "/admin/login"  # no session: the login
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "login").click()
    error = WebDriverWait(browser, 10).until(
        expected_conditions.presence_of_element_located((By.ID, "error")))  # the 401's form
    assert "not the admin token" in error.text
    browser.find_element(By.ID, "token").send_keys(ADMIN)
    browser.find_element(By.ID, "login").click()
    arrived("/admin")
    # the cookie is out of every script's reach
    assert browser.execute_script("return document.cookie") == ""
    browser.find_element(By.LINK_TEXT, "shop").click()
    arrived("/admin/apps/shop")
    agents = browser.find_element(By.ID, "agents").text
    assert agent_id in agents and "attested" in agents
    assert_inert(browser, "audit")
    if screenshot:
        browser.save_screenshot(screenshot)
    browser.find_element(By.LINK_TEXT, "Ledger").click()
    arrived("/admin/ledger")
    assert "acme-1" in browser.find_element(By.ID, "nodes").text
    assert_inert(browser, "nodes")
    try:
        alert = browser.switch_to.alert
        raise AssertionError(f"an alert opened: {alert.text}")
    except NoAlertPresentException:
        pass
    browser.find_element(By.ID, "logout").click()
    arrived("/admin/login")
    browser.get(url + "/admin")
    assert browser.current_url == url + "/admin/login"  # the session ended


async def test_the_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    browser = await trio.to_thread.run_sync(driver)
    try:
        pki = devpki.make_pki(seed=20)
        async with open_ledger_plane(tmp_path, pki, None) as plane:
            await plane.create_node("acme-1")
            await plane.ok("POST", "/v1/nodes/acme-1/status", headers=key(),
                           json={"status": "suspended", "reason": XSS})
            async with running_agent(FakeAgent(plane.cp.ws_url, pki)) as agent:
                await agent.wait_status("attested")
                await trio.to_thread.run_sync(hostile_audit_row, Path(plane.cp.config.db_path),
                                              agent.agent_id)
                await trio.to_thread.run_sync(
                    walk_through, browser, plane.cp.url, agent.agent_id,
                    os.environ.get("EE_DASHBOARD_SCREENSHOT"))
    finally:
        await trio.to_thread.run_sync(browser.quit)
