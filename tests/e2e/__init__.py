"""End-to-end tests: the admin in a real headless browser (Debian's Chromium driven by Playwright)."""
