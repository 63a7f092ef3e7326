"""The web explorer in a real headless Chromium (selenium 4, Debian's chromium and chromedriver): what a person sees.

Skipped when chromium is not installed and this is not CI (``make browser`` installs it; CI must have it).
``TRACIN_EXPLORER_SCREENSHOT=docs/explorer.png`` saves a screenshot of the explained prediction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracin_index import BuildConfig, build_index, load_model, open_index
from tracin_index.query import TracinIndex
from tracin_index.serve.app import create_app

from .conftest import Trained
from .serving import running

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 60  # seconds for an answer to show


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need {' and '.join(missing)} in CI: run make browser")
    pytest.skip(f"{' and '.join(missing)} not installed (make browser, or apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def home(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_browser()
    out = tmp_path_factory.mktemp("explorer") / "idx"
    build_index(load_model(conve_inverse.directory), out, checkpoints=conve_inverse.checkpoints, config=BuildConfig())
    return out


@pytest.fixture(scope="module")
def api(home: Path) -> TracinIndex:
    return open_index(home)


@pytest.fixture(scope="module")
def site(home: Path) -> Iterator[str]:
    with running(create_app(home, poll=0)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,1150",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(browser: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT).until(condition)


def _all(browser: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, selector))


def _one(browser: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, selector)


def _ask(browser: Any, site: str, head: str, relation: str, tail: str) -> None:
    browser.get(site + "/")
    _wait(browser, lambda b: _one(b, "#build").text not in ("", "…"))  # the info answer arrived
    for selector, text in (("#head", head), ("#relation", relation), ("#tail", tail)):
        box = _one(browser, selector)
        box.clear()
        box.send_keys(text)
    _one(browser, "#ask").click()


def test_predictions_then_influence_bars_and_graph(browser: Any, site: str, api: TracinIndex) -> None:
    _ask(browser, site, "brazil", "commonbloc1", "?")
    items = _wait(browser, lambda b: _all(b, "#predictions li"))
    expected = api.predict("brazil commonbloc1 ?", n=10)
    assert [li.get_attribute("data-label") for li in items] == [p["label"] for p in expected]
    assert expected[0]["label"] in items[0].text
    assert _one(browser, "#error").is_displayed() is False

    items[0].click()
    _wait(browser, lambda b: _all(b, ".bar.proponent") and _all(b, ".bar.opponent"))
    pros, opps = _all(browser, ".bar.proponent"), _all(browser, ".bar.opponent")
    [result] = api.query(f"brazil commonbloc1 {expected[0]['label']}", k=10)
    assert (len(pros), len(opps)) == (len(result.proponents), len(result.opponents))
    assert "active" in (items[0].get_attribute("class") or "")
    assert expected[0]["label"] in _one(browser, "#test-triple").text
    rows = [r.text for r in _all(browser, "#proponents .row")]
    first = result.proponents[0]
    assert f"{first.head} {first.relation} {first.tail}" in rows[0]
    # bar widths are proportional to |influence|: the largest is full width
    widths = [float(b.get_attribute("style").split("width:")[1].split("%")[0]) for b in pros + opps]
    assert max(widths) == pytest.approx(100.0)
    top = max(abs(i.influence) for i in result.proponents + result.opponents)
    assert widths[0] == pytest.approx(100 * abs(first.influence) / top, abs=0.02)

    edges = _all(browser, "#graph .edge")
    assert len(edges) == 1 + len(pros) + len(opps)
    assert len(_all(browser, "#graph .edge.test")) == 1
    assert len(_all(browser, "#graph .edge.proponent")) == len(pros)
    assert len(_all(browser, "#graph .edge.opponent")) == len(opps)
    shown = {i.head for i in result.proponents + result.opponents} | {i.tail for i in result.proponents + result.opponents}
    shown |= {"brazil", expected[0]["label"]}
    nodes = _all(browser, "#graph .node")
    assert {n.get_attribute("data-label") for n in nodes} == shown and len(nodes) == len(shown)
    assert all(n.is_displayed() for n in nodes)

    target = os.environ.get("TRACIN_EXPLORER_SCREENSHOT")
    if target:
        browser.save_screenshot(target)


def test_a_full_triple_shows_its_influence(browser: Any, site: str, api: TracinIndex) -> None:
    _ask(browser, site, "usa", "intergovorgs", "uk")
    _wait(browser, lambda b: "usa intergovorgs uk" in _one(b, "#test-triple").text and _all(b, ".bar.proponent"))
    [result] = api.query("usa intergovorgs uk", k=10)
    assert len(_all(browser, ".bar.proponent")) == len(result.proponents)
    assert len(_all(browser, "#graph .edge")) == 1 + len(result.proponents) + len(result.opponents)


def test_an_unknown_label_shows_the_service_error(browser: Any, site: str) -> None:
    _ask(browser, site, "brazl", "commonbloc1", "?")
    error = _wait(browser, lambda b: _one(b, "#error").is_displayed() and _one(b, "#error"))
    assert "unknown entity 'brazl'" in error.text and "closest known: brazil" in error.text
    assert _all(browser, "#predictions li") == []


def test_self_influence_tab_lists_the_top_training_triples(browser: Any, site: str, api: TracinIndex) -> None:
    browser.get(site + "/")
    _one(browser, "#tab-self").click()
    rows = _wait(browser, lambda b: _all(b, "#self-table tbody tr"))
    assert len(rows) == 20
    expected = api.self_influence(20)
    cells = [c.text for c in rows[0].find_elements("css selector", "td")]
    assert cells[:4] == ["1", expected[0].head, expected[0].relation, expected[0].tail]
    assert _one(browser, "#explain-panel").is_displayed() is False


def test_labels_complete_as_a_person_types(browser: Any, site: str) -> None:
    browser.get(site + "/")
    _one(browser, "#head").send_keys("in")
    _wait(browser, lambda b: [o.get_attribute("value") for o in _all(b, "#entities option")] == ["india", "indonesia", "china"])
    _wait(browser, lambda b: len(_all(b, "#relations option")) == 55)
