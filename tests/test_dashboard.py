"""The dashboard (docs/dashboard.md) in a real headless Chromium against `taskd serve --demo`."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .service import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with Service(tmp_path_factory.mktemp("demo"), "--demo", env={"TASKD_DEMO_SEED": "7"}) as s:
        yield s


@pytest.fixture
def page(browser: Browser, demo: Service) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(demo.url + "/")
    yield pg
    context.close()
    assert errors == []


def api(url: str) -> Any:
    with urllib.request.urlopen(url) as resp:
        return json.loads(resp.read())


def test_rows_appear_and_progress_advances_without_reload(page: Page, demo: Service) -> None:
    expect(page.locator("#conn")).to_have_text("live")
    running = page.locator('#rows tr[data-status="running"]').first
    expect(running).to_be_visible(timeout=15_000)
    task_id = running.get_attribute("data-id")
    bar = page.locator(f'#rows tr[data-id="{task_id}"] progress')
    first = float(bar.get_attribute("value") or 0)
    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url))
    # the same row moves on: its bar advances, or the task finishes, by push alone
    page.wait_for_function(
        """([id, first]) => {
            const tr = document.querySelector(`#rows tr[data-id="${id}"]`);
            if (!tr) return false;
            if (tr.dataset.status !== "running") return true;
            const bar = tr.querySelector("progress");
            return bar && Number(bar.value) > first;
        }""",
        arg=[task_id, first],
        timeout=20_000,
    )
    # new tasks appear as rows, pushed too
    before = page.locator("#rows tr[data-id]").count()
    page.wait_for_function(
        "n => document.querySelectorAll('#rows tr[data-id]').length > n",
        arg=before,
        timeout=20_000,
    )
    assert navigations == []


def test_status_filter_and_counts(page: Page, demo: Service) -> None:
    expect(page.locator('.count[data-status="completed"]')).to_be_visible()
    page.wait_for_function(
        "() => document.querySelectorAll('#rows tr[data-status=\"completed\"]').length > 0",
        timeout=20_000,
    )
    page.select_option("#f-status", "completed")
    page.click("button[type=submit]")
    expect(page.locator("#rows tr").first).to_have_attribute("data-status", "completed")
    statuses = page.locator("#rows tr").evaluate_all("rows => rows.map(r => r.dataset.status)")
    assert statuses and set(statuses) == {"completed"}
    page.fill("#f-type", "no-such-type")
    page.click("button[type=submit]")
    expect(page.locator("#rows .empty")).to_be_visible()


def test_cancel_button(page: Page, demo: Service) -> None:
    # A demo job may finish between finding its row and the click landing; then the
    # cancel is refused (409) and the row ends completed or failed: try another one.
    for _ in range(5):
        running = page.locator('#rows tr[data-status="running"]').first
        expect(running).to_be_visible(timeout=15_000)
        task_id = running.get_attribute("data-id")
        running.locator('button[data-action="cancel"]').click()
        row = page.locator(f'#rows tr[data-id="{task_id}"]')
        expect(row).to_have_attribute(
            "data-status", re.compile("cancelled|completed|failed"), timeout=10_000
        )
        rec = api(f"{demo.url}/api/v1/tasks/{task_id}")["result"]
        if rec["status"] == "cancelled":
            assert row.get_attribute("data-status") == "cancelled"
            return
    raise AssertionError("every task picked finished before its cancel")


def test_failed_task_shows_its_error(page: Page, demo: Service) -> None:
    page.select_option("#f-status", "failed")
    page.click("button[type=submit]")
    failed = page.locator('#rows tr[data-status="failed"]').first
    expect(failed).to_be_visible(timeout=40_000)
    task_id = failed.get_attribute("data-id")
    failed.click()
    panel = page.locator("#detail")
    expect(panel).to_be_visible()
    shown = panel.locator('dd[data-field="error"]').inner_text()
    rec = api(f"{demo.url}/api/v1/tasks/{task_id}")["result"]
    assert shown.strip() == rec["error"] and rec["error"]
    assert "hunter2" not in shown and "AKIAIOSFODNN7EXAMPLE" not in shown
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()


def test_chart_history_and_duration_explain_what_happened(page: Page, demo: Service) -> None:
    """The chart draws the server's per-minute counters (docs/dashboard.md); a
    finished row shows how long it ran; its panel lists the statuses it went through."""
    page.select_option("#f-status", "failed")
    page.click("button[type=submit]")
    failed = page.locator('#rows tr[data-status="failed"]').first
    expect(failed).to_be_visible(timeout=40_000)
    task_id = failed.get_attribute("data-id")
    rec = api(f"{demo.url}/api/v1/tasks/{task_id}")["result"]
    assert re.fullmatch(r"\d+\.\d+s", failed.locator("td.duration").inner_text().strip())
    failed.click()
    steps = page.locator('#detail dd[data-field="history"] li')
    expect(steps).to_have_count(len(rec["history"]))
    assert [steps.nth(i).get_attribute("data-status") for i in range(steps.count())] == [
        h["status"] for h in rec["history"]
    ]
    assert rec["history"][-1] == {"status": "failed", "at": rec["finished_at"]}
    page.keyboard.press("Escape")
    # The chart shows at least this failure, as the server counts it.
    page.evaluate("loadChart()")
    bad = page.locator("#chart rect.bad")
    expect(bad.first).to_be_attached(timeout=15_000)
    drawn = sum(int(bad.nth(i).get_attribute("data-count") or 0) for i in range(bad.count()))
    stats = api(f"{demo.url}/api/v1/stats")["result"]
    counted = sum(row[2] for row in stats["finished_per_minute"])
    assert 1 <= drawn <= counted  # the page drew an earlier snapshot of a rising count
    assert int(page.locator("#chart-bad").inner_text()) == drawn


def test_keyboard_and_narrow_screen(browser: Browser, demo: Service, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 800})
    pg = context.new_page()
    pg.goto(demo.url + "/")
    expect(pg.locator("#rows tr[data-id]").first).to_be_visible(timeout=15_000)
    # a row is reachable and opens with Enter
    task_id = pg.locator("#rows tr[data-id]").first.get_attribute("data-id")
    assert task_id
    row = pg.locator(f'#rows tr[data-id="{task_id}"]')
    row.focus()
    # Each pushed change rebuilds the rows (at the latest the 15 s refresh does): the
    # focus must move to the new copy of the row, or Enter would go to <body>.
    focused = row.element_handle()
    pg.wait_for_function("tr => !tr.isConnected", arg=focused, timeout=20_000)
    focused.dispose()
    expect(row).to_be_focused()
    pg.keyboard.press("Enter")
    expect(pg.locator("#detail")).to_be_visible()
    expect(pg.locator("#detail-title")).to_contain_text(task_id)
    # no horizontal scrolling on a phone-sized screen
    assert pg.evaluate("document.documentElement.scrollWidth") <= 400
    pg.screenshot(path=str(tmp_path / "narrow.png"))
    context.close()


def test_token_auth(browser: Browser, tmp_path: Path) -> None:
    with Service(tmp_path, "--token", "alice=secret-token") as s:
        urllib.request.urlopen(
            urllib.request.Request(
                s.url + "/api/v1/tasks",
                data=b'{"task_type":"auth_check"}',
                method="POST",
                headers={"Authorization": "Bearer secret-token"},
            )
        ).read()
        context = browser.new_context()
        pg = context.new_page()
        pg.goto(s.url + "/")
        expect(pg.locator("#error")).to_contain_text("Unauthorized")
        pg.fill("#token", "secret-token")
        pg.press("#token", "Enter")
        expect(pg.locator("#rows tr[data-id]")).to_have_count(1)
        expect(pg.locator("#conn")).to_have_text("live")
        assert pg.evaluate("sessionStorage.getItem('taskd-token')") == "secret-token"
        context.close()


def test_page_makes_no_outside_requests(browser: Browser, demo: Service) -> None:
    context = browser.new_context()
    pg = context.new_page()
    seen: list[str] = []
    pg.on("request", lambda r: seen.append(r.url))
    pg.goto(demo.url + "/")
    expect(pg.locator("#conn")).to_have_text("live")
    context.close()
    assert seen and all(u.startswith(demo.url) or u.startswith("data:") for u in seen)


def test_detail_panel_shows_times_and_keeps_the_page_still(browser: Browser, demo: Service) -> None:
    # 800 px: the table is wider than the window, where a click used to scroll the page.
    context = browser.new_context(viewport={"width": 800, "height": 860})
    page = context.new_page()
    page.goto(demo.url + "/")
    page.select_option("#f-status", "completed")
    page.click("button[type=submit]")
    done = page.locator('#rows tr[data-status="completed"]').first
    expect(done).to_be_visible(timeout=40_000)
    task_id = done.get_attribute("data-id")
    before = page.evaluate("() => [window.scrollX, document.documentElement.scrollWidth]")
    done.click()
    panel = page.locator("#detail")
    expect(panel).to_be_visible()
    after = page.evaluate(
        "() => [window.scrollX, document.documentElement.scrollWidth, window.innerWidth]"
    )
    # Opening the panel neither scrolls the page sideways nor widens it.
    assert after[0] == before[0] == 0 and after[1] <= after[2], (before, after)
    rec = api(f"{demo.url}/api/v1/tasks/{task_id}")["result"]
    started = panel.locator('dd[data-field="started"]').inner_text()
    finished = panel.locator('dd[data-field="finished"]').inner_text()
    duration = panel.locator('dd[data-field="duration"]').inner_text()
    assert started and finished and duration.endswith("s")
    expected = rec["finished_at"] - rec["started_at"]
    assert abs(float(duration.rstrip("s")) - expected) < 0.1
    context.close()


def test_running_rows_show_a_percentage(page: Page, demo: Service) -> None:
    running = page.locator('#rows tr[data-status="running"]').first
    expect(running).to_be_visible(timeout=15_000)
    expect(running.locator(".pct")).to_have_text(re.compile(r"^\d{1,3}%$"))


def test_chart_legend_matches_its_bars_and_times_share_one_format(
    browser: Browser, tmp_path: Path
) -> None:
    """docs/dashboard.md: the legend counts exactly what each colour of bar draws
    (cancelled has its own), and every instant in the detail panel has one form."""
    with Service(tmp_path) as s:
        ids = {}
        for end in ("complete", "fail", "cancel"):
            tid = api_call(s.url, "POST", "/tasks", {"task_type": "chart"})["task_id"]
            if end != "cancel":
                api_call(s.url, "POST", f"/tasks/{tid}/start", {})
            body = {"complete": {"result": 1}, "fail": {"error": "boom"}}.get(end, {})
            api_call(s.url, "POST", f"/tasks/{tid}/{end}", body)
            ids[end] = tid
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        pg = context.new_page()
        pg.goto(s.url + "/")
        drawn = {}
        for cls, legend in (("ok", "#chart-ok"), ("bad", "#chart-bad"),
                            ("cancelled", "#chart-cancelled")):  # fmt: skip
            bars = pg.locator(f"#chart rect.{cls}")
            expect(bars.first).to_be_attached(timeout=10_000)
            drawn[cls] = sum(
                int(bars.nth(i).get_attribute("data-count") or 0) for i in range(bars.count())
            )
            assert pg.locator(legend).inner_text() == str(drawn[cls]), cls
        assert drawn == {"ok": 1, "bad": 1, "cancelled": 1}
        row = pg.locator(f'#rows tr[data-id="{ids["complete"]}"]')
        instant = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
        assert instant.fullmatch(row.locator("td").nth(6).get_attribute("title") or "")
        row.click()
        panel = pg.locator("#detail")
        expect(panel).to_be_visible()
        for field in ("created", "started", "finished", "updated"):
            text = panel.locator(f'dd[data-field="{field}"]').inner_text()
            assert instant.fullmatch(text), (field, text)
        for step in panel.locator('dd[data-field="history"] li').all_inner_texts():
            assert instant.search(step) and not re.search(r"\.\d{4,}Z", step), step
        context.close()


def api_call(url: str, method: str, path: str, body: Any) -> Any:
    req = urllib.request.Request(
        url + "/api/v1" + path, data=json.dumps(body).encode(), method=method
    )
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())["result"]


def make_tree(url: str) -> dict[str, str]:
    """A running parent with two children (docs/dashboard.md, "Task trees"): one
    running, with a pending child of its own, and one completed."""

    def new(task_type: str, parent: str | None = None) -> str:
        body = {"task_type": task_type}
        if parent is not None:
            body["parent_id"] = parent
        task_id: str = api_call(url, "POST", "/tasks", body)["task_id"]
        return task_id

    ids = {"batch": new("batch")}
    api_call(url, "POST", f"/tasks/{ids['batch']}/start", {})
    for kind in ("import", "index"):
        ids[kind] = new(kind, ids["batch"])
        api_call(url, "POST", f"/tasks/{ids[kind]}/start", {})
    ids["chunk"] = new("chunk", ids["import"])
    api_call(url, "POST", f"/tasks/{ids['index']}/complete", {"result": 1})
    return ids


def tree_rows(pg: Page) -> list[dict[str, str | None]]:
    """The table's task rows in order: id, type, status, depth, parent."""
    rows: list[dict[str, str | None]] = pg.locator("#rows tr[data-id]").evaluate_all(
        """rows => rows.map(r => ({id: r.dataset.id, type: r.cells[1].textContent,
            status: r.dataset.status, depth: r.dataset.depth || null,
            parent: r.dataset.parent || null}))"""
    )
    return rows


def test_tree_rows_expand_under_their_parent(browser: Browser, tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        ids = make_tree(s.url)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(s.url + "/")
        expect(pg.locator("#conn")).to_have_text("live")
        toggle = pg.locator(f'#rows tr[data-id="{ids["batch"]}"] button[data-action="toggle"]')
        expect(toggle).to_have_text("▸ 2 children")
        expect(toggle).to_have_attribute("aria-expanded", "false")
        expect(toggle).to_have_accessible_name(f"2 children of task {ids['batch']}")
        # Collapsed: every task is a row of its own, a child marked as one.
        expect(pg.locator("#rows tr[data-id]")).to_have_count(4)
        assert all(r["depth"] is None for r in tree_rows(pg))
        toggle.click()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        nested = pg.locator(f'#rows tr[data-parent="{ids["batch"]}"][data-depth="1"]')
        expect(nested).to_have_count(2)
        # The children come right under their parent, once each (newest first).
        rows = tree_rows(pg)
        at = [r["id"] for r in rows].index(ids["batch"])
        assert [(r["id"], r["type"], r["status"], r["depth"]) for r in rows[at + 1 : at + 3]] == [
            (ids["index"], "index", "completed", "1"),
            (ids["import"], "import", "running", "1"),
        ]
        assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
        # A child that has children expands too: its own go one level deeper.
        inner = pg.locator(f'#rows tr[data-id="{ids["import"]}"] button[data-action="toggle"]')
        expect(inner).to_have_text("▸ 1 child")
        inner.focus()
        pg.keyboard.press("Enter")  # a native button: the keyboard works it
        chunk = pg.locator(f'#rows tr[data-id="{ids["chunk"]}"]')
        expect(chunk).to_have_attribute("data-depth", "2")
        expect(inner).to_be_focused()  # the rebuilt rows give the focus back to it
        order = [r["id"] for r in tree_rows(pg)]
        at = order.index(ids["batch"])
        assert order[at:] == [ids["batch"], ids["index"], ids["import"], ids["chunk"]]
        # Live: a child's change shows in place under its parent; the parent's
        # children counts follow (the toggle's tooltip).
        api_call(s.url, "POST", f"/tasks/{ids['chunk']}/start", {})
        expect(chunk).to_have_attribute("data-status", "running")
        expect(chunk).to_have_attribute("data-depth", "2")
        expect(toggle).to_have_attribute("title", "1 running, 1 completed")
        # A new child appears under its expanded parent, pushed.
        late = api_call(s.url, "POST", "/tasks", {"task_type": "late", "parent_id": ids["batch"]})
        expect(pg.locator(f'#rows tr[data-id="{late["task_id"]}"]')).to_have_attribute(
            "data-depth", "1"
        )
        expect(toggle).to_have_text("▾ 3 children")
        # A refresh (the filter applied again) keeps what was expanded expanded ...
        pg.click("button[type=submit]")
        expect(chunk).to_have_attribute("data-depth", "2")
        # ... and so does a reload of the tab.
        pg.reload()
        expect(pg.locator(f'#rows tr[data-id="{ids["chunk"]}"]')).to_have_attribute(
            "data-depth", "2"
        )
        # Collapsing puts the children back as rows of their own; one still expanded
        # keeps its own children under it.
        pg.locator(f'#rows tr[data-id="{ids["batch"]}"] button[data-action="toggle"]').click()
        expect(pg.locator(f'#rows tr[data-parent="{ids["batch"]}"][data-depth]')).to_have_count(0)
        expect(pg.locator("#rows tr[data-depth]")).to_have_count(1)
        expect(pg.locator(f'#rows tr[data-id="{ids["chunk"]}"]')).to_have_attribute(
            "data-depth", "1"
        )
        pg.locator(f'#rows tr[data-id="{ids["import"]}"] button[data-action="toggle"]').click()
        expect(pg.locator("#rows tr[data-depth]")).to_have_count(0)
        expect(pg.locator("#rows tr[data-id]")).to_have_count(5)
        context.close()
        assert errors == []


def test_tree_in_the_detail_panel(browser: Browser, tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        ids = make_tree(s.url)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(s.url + "/")
        expect(pg.locator("#conn")).to_have_text("live")
        pg.locator(f'#rows tr[data-id="{ids["batch"]}"] td').nth(1).click()
        panel = pg.locator("#detail")
        expect(panel).to_be_visible()
        expect(panel.locator('dd[data-field="parent"]')).to_have_text("")
        children = panel.locator('dd[data-field="children"]')
        expect(children.locator(".child-counts span")).to_have_text(["1 running", "1 completed"])
        listed = children.locator("li")
        expect(listed).to_have_count(2)
        assert listed.evaluate_all("lis => lis.map(li => [li.dataset.id, li.dataset.status])") == [
            [ids["index"], "completed"],
            [ids["import"], "running"],
        ]
        expect(children.locator(f'li[data-id="{ids["import"]}"]')).to_contain_text("1 child")
        # Live: a child that finishes moves in the counts and the list.
        api_call(s.url, "POST", f"/tasks/{ids['import']}/complete", {"result": 2})
        expect(children.locator(".child-counts span")).to_have_text(["2 completed"])
        expect(children.locator(f'li[data-id="{ids["import"]}"]')).to_have_attribute(
            "data-status", "completed"
        )
        # A child opens its own detail, which links back to its parent.
        children.get_by_role("button", name=f"Open child task {ids['import']}").click()
        expect(pg.locator("#detail-title")).to_have_text(f"import · {ids['import']}")
        up = panel.locator('dd[data-field="parent"] button')
        expect(up).to_have_text(f"batch · {ids['batch']}")
        expect(up).to_have_accessible_name(f"Open parent task {ids['batch']}")
        expect(panel.locator('dd[data-field="children"] li')).to_have_count(1)
        # The grandchild's panel: its parent is the child, whose parent is the root.
        panel.locator(f'dd[data-field="children"] li[data-id="{ids["chunk"]}"] button').click()
        expect(pg.locator("#detail-title")).to_have_text(f"chunk · {ids['chunk']}")
        expect(panel.locator('dd[data-field="children"]')).to_have_text("")
        panel.locator('dd[data-field="parent"] button').click()
        expect(pg.locator("#detail-title")).to_have_text(f"import · {ids['import']}")
        panel.locator('dd[data-field="parent"] button').click()
        expect(pg.locator("#detail-title")).to_have_text(f"batch · {ids['batch']}")
        # The panel's links work from the keyboard too, and keep the focus in the panel.
        link = panel.locator(f'dd[data-field="children"] li[data-id="{ids["index"]}"] button')
        link.focus()
        pg.keyboard.press("Enter")
        expect(pg.locator("#detail-title")).to_have_text(f"index · {ids['index']}")
        expect(panel).to_be_focused()
        context.close()
        assert errors == []


def test_tree_children_page_on(browser: Browser, tmp_path: Path) -> None:
    """Children are listed a page (50) at a time, under the row and in the panel."""
    with Service(tmp_path) as s:
        parent = api_call(s.url, "POST", "/tasks", {"task_type": "fanout"})["task_id"]
        kids = [
            api_call(s.url, "POST", "/tasks", {"task_type": "part", "parent_id": parent})["task_id"]
            for _ in range(53)
        ]
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        pg = context.new_page()
        pg.goto(s.url + "/")
        pg.fill("#f-id", parent)  # the parent alone on the page
        pg.click("button[type=submit]")
        pg.locator(f'#rows tr[data-id="{parent}"] button[data-action="toggle"]').click()
        nested = pg.locator(f'#rows tr[data-parent="{parent}"][data-depth="1"]')
        expect(nested).to_have_count(50)
        more = pg.get_by_role("button", name=f"More children of task {parent}")
        more.click()
        expect(nested).to_have_count(53)
        expect(more).to_have_count(0)
        assert nested.evaluate_all("rs => rs.map(r => r.dataset.id)") == kids[::-1]
        pg.locator(f'#rows tr[data-id="{parent}"] td').nth(1).click()
        listed = pg.locator('#detail dd[data-field="children"] li')
        expect(listed).to_have_count(53)  # the children the table listed already
        context.close()
