"""Launching Debian's Chromium with Playwright (never a downloaded browser), and watching a page for errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Playwright, Response

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Playwright's waits (expect, wait_for, navigation), in milliseconds: generous, the machine is shared.
TIMEOUT_MS = 20_000


def launch(playwright: Playwright) -> Browser:
    """Start headless Chromium from ``/usr/bin/chromium``; raises (the test fails) if it cannot start."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@dataclass
class PageProblems:
    """What went wrong while pages loaded: HTTP errors (pages, CSS, JS, images), JS exceptions, console errors."""

    http: list[str] = field(default_factory=list)
    javascript: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("response", self._on_response)
        page.on("pageerror", self._on_page_error)
        page.on("console", self._on_console)

    def _on_response(self, response: Response) -> None:
        # Browsers ask for /favicon.ico on their own; the admin has none, and no page links to it.
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            self.http.append(f"{response.status} {response.request.method} {response.url}")

    def _on_page_error(self, error: Error) -> None:
        self.javascript.append(f"uncaught: {error}")

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            self.javascript.append(f"console: {message.text}")

    def all(self) -> list[str]:
        return [*self.http, *self.javascript]
