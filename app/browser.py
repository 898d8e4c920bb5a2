"""Drive the demo from outside: start `python -m app` as a subprocess on a free loopback port,
and open it in headless Chromium with Playwright. tests/test_app.py and `python -m app.screenshot`
(the README's screenshot) share this code, so the screenshot is what the test sees.

The browser is always Debian's `chromium` found on PATH, never one Playwright downloads.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class BrowserMissing(RuntimeError):
    """No `chromium` on PATH."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServedURL(str):
    """The served demo's URL; `.pid` is the server process (for its memory figures)."""

    pid: int


@contextmanager
def serve(app_args: list[str], timeout_s: float = 120.0, host: str = "127.0.0.1"):
    """Run `python -m app APP_ARGS --host HOST --port <free>`; yield its URL (a ServedURL) once
    it answers HTTP.

    Raises RuntimeError with the server's output if it exits or is not ready within timeout_s.
    The server is terminated (then killed) on exit.
    """
    port = free_port(host)
    url = f"http://{host}:{port}/"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", *app_args, "--host", host, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`python -m app` exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"`python -m app` not ready after {timeout_s:.0f} s:\n{_tail(log)}"
                )
            time.sleep(0.25)
        served = ServedURL(url)
        served.pid = proc.pid
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _tail(log, n: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise BrowserMissing(
            "no `chromium` on PATH; fix: `make browser` (or `apt-get install -y chromium`: "
            "Debian's package; `make test` installs it). A browser is never downloaded."
        )
    return path


# Counts finished Compare chains: the start step disables the button, the score step re-enables
# it. Attribute records carry the old value, so a fast disable/enable pair is still counted.
_WATCH_RUN_BUTTON = """() => {
    window.__demoDone = 0;
    new MutationObserver((records) => {
        for (const r of records) if (r.attributeName === "disabled" && r.oldValue !== null)
            window.__demoDone++;
    }).observe(document.querySelector("#run"), {attributes: true, attributeOldValue: true});
}"""


# The same count for the explorer tab's chain (its button: disabled, then enabled again).
_WATCH_EXPLORER_BUTTON = _WATCH_RUN_BUTTON.replace("__demoDone", "__explorerDone").replace(
    "#run", "#explorer-run"
)


class DemoPage:
    """The demo open in a browser tab: submit prompts, read what it shows, take screenshots."""

    def __init__(self, page, timeout_s: float):
        self.page = page
        self.page.set_default_timeout(timeout_s * 1000)
        self.done = 0
        self.explored = 0  # explorer chains finished in this page

    def submit(self, prompt: str) -> dict[str, str]:
        """Type `prompt`, click Compare, wait until the whole chain (start, streaming compare,
        score) has finished, and return what the page shows: base, tuned, base_reward,
        tuned_reward, notice."""
        page = self.page
        page.locator("#prompt textarea").fill(prompt)
        page.locator("#run").click()
        self.done += 1
        page.wait_for_function(f"() => window.__demoDone >= {self.done}")
        return self.shown()

    def shown(self) -> dict[str, str]:
        page = self.page
        return {
            "base": page.locator("#base-output textarea").input_value(),
            "tuned": page.locator("#tuned-output textarea").input_value(),
            "base_reward": self.markdown("base-reward"),
            "tuned_reward": self.markdown("tuned-reward"),
            "notice": self.markdown("notice"),
        }

    def markdown(self, elem_id: str) -> str:
        """The rendered text of a gr.Markdown (not its progress timer)."""
        return self.page.locator(f'#{elem_id} [data-testid="markdown"]').inner_text().strip()

    def explore(self, prompt: str, group_size: int = 8, answer: str = "") -> dict:
        """Open the "Inside one GRPO step" tab, type `prompt` (and `answer`; empty: the task's),
        set G, click "Run one step", wait for the chain to finish; return notice, summary,
        completions (the table's rows as text), tokens (the token spans' text per completion)
        and downloads (the offered files' names)."""
        from .explorer_ui import TAB_TITLE

        page = self.page
        page.get_by_role("tab", name=TAB_TITLE).click()
        page.locator("#explorer-run").wait_for()
        if not page.evaluate("() => '__explorerDone' in window"):
            page.evaluate(_WATCH_EXPLORER_BUTTON)
        page.locator("#explorer-prompt textarea").fill(prompt)
        page.locator("#explorer-answer textarea").fill(answer)
        page.locator("#explorer-g input").fill(str(group_size))
        page.locator("#explorer-run").click()
        self.explored += 1
        page.wait_for_function(f"() => window.__explorerDone >= {self.explored}")
        rows = page.locator("#explorer-table tbody tr")
        token_rows = page.locator("#explorer-token-view .xp-row")
        return {
            "notice": self.markdown("explorer-notice"),
            "summary": self.markdown("explorer-summary"),
            "completions": [rows.nth(i).inner_text() for i in range(rows.count())],
            "tokens": [
                token_rows.nth(i).locator(".xp-tok").all_inner_texts()
                for i in range(token_rows.count())
            ],
            "downloads": page.locator("#explorer-downloads a[href]").evaluate_all(
                "links => links.map((a) => decodeURIComponent(a.href.split('/').pop()))"
            ),
        }

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path


@contextmanager
def open_demo(url: str, timeout_s: float = 60.0, width: int = 1280, height: int = 900):
    """Yield a DemoPage for the demo at `url` in headless Debian Chromium (or BrowserMissing)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            demo = DemoPage(page, timeout_s)
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#run").wait_for()
            page.evaluate(_WATCH_RUN_BUTTON)
            yield demo
        finally:
            browser.close()


def explore_in_browser(
    url: str,
    prompt: str,
    screenshot: str | Path,
    group_size: int = 8,
    answer: str = "",
    timeout_s: float = 60.0,
) -> dict:
    """Open the demo, run one explorer step on `prompt`, save a full-page screenshot of the tab;
    return what the tab shows (DemoPage.explore)."""
    with open_demo(url, timeout_s) as demo:
        shown = demo.explore(prompt, group_size, answer)
        demo.screenshot(screenshot)
    return shown


def compare_in_browser(
    url: str, prompt: str, screenshot: str | Path, timeout_s: float = 60.0
) -> dict[str, str]:
    """Open the demo, submit `prompt`, save a full-page screenshot; return what the page shows."""
    with open_demo(url, timeout_s) as demo:
        shown = demo.submit(prompt)
        demo.screenshot(screenshot)
    return shown
