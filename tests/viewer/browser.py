"""Headless Debian Chromium driven by Playwright for Python, and tiny local HTTP servers.

Chromium is /usr/bin/chromium (scripts/install_viewer.sh installs it); Playwright never
downloads a browser. Every server binds 127.0.0.1 and is stopped by the test that started it.
"""

from __future__ import annotations

import http.server
import shutil
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def browser_missing_reason() -> str | None:
    """Why no browser test can run here, or None."""
    if not Path(CHROMIUM).exists():
        return "Debian chromium is not installed (scripts/install_viewer.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed in .venv (scripts/install_viewer.sh)"
    return None


@contextmanager
def chromium_page(tmp_path: Path, *, width: int = 1280, height: int = 900) -> Iterator:
    """A fresh headless Chromium (own user data dir) and one page; closed on exit."""
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextmanager
def serve(handler_class: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler_class`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = _QuietServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def static_handler(root: Path, *, spa_fallback: bool = False, proxy: dict[str, str] | None = None,
                   overrides: dict[str, bytes] | None = None):
    """A handler serving files under ``root``.

    ``spa_fallback``: unknown paths without a file extension get ``index.html`` (OHIF's
    client-side routes such as ``/viewer``). ``proxy``: path prefix -> upstream base URL
    (e.g. ``{"/dicom-web": "http://127.0.0.1:8042"}``), GET only, so that the page and
    DICOMweb share one origin (Orthanc 1.10 has no CORS). ``overrides``: path -> body.
    """
    root = root.resolve()
    proxy = proxy or {}
    overrides = overrides or {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {
            **http.server.SimpleHTTPRequestHandler.extensions_map,
            ".wasm": "application/wasm",
            ".js": "text/javascript",
            ".mjs": "text/javascript",
            ".json": "application/json",
            ".svg": "image/svg+xml",
        }

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format, *args):  # noqa: A002 - quiet test output
            pass

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path in overrides:
                body = overrides[path]
                self.send_response(200)
                self.send_header("Content-Type", self.guess_type(path))
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)
                return
            for prefix, upstream in proxy.items():
                if path == prefix or path.startswith(prefix + "/"):
                    return self._proxy(upstream + self.path)
            target = root / path.lstrip("/")
            if spa_fallback and not target.exists() and "." not in path.rsplit("/", 1)[-1]:
                self.path = "/index.html"
            return super().do_GET()

        def _proxy(self, url: str):
            # Host is forwarded so that URLs Orthanc writes into DICOMweb JSON (BulkDataURI)
            # point at this origin, not at Orthanc's port.
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range", "host")}
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, body, reply_headers = response.status, response.read(), response.headers
            except urllib.error.HTTPError as error:
                status, body, reply_headers = error.code, error.read(), error.headers
            self.send_response(status)
            for key in ("Content-Type",):
                if reply_headers.get(key):
                    self.send_header(key, reply_headers[key])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
