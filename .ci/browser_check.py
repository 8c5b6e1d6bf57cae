"""Open every page of the built book in headless Chromium and fail on anything a reader would see broken.

    python .ci/browser_check.py [_build/html] [--screenshot book/01_neural_collapse.html]

The pages are served from a local HTTP server on 127.0.0.1 and Chromium resolves no other host
(``--host-resolver-rules``), so the check shows the book as it reads with no network. Per page it
counts, after MathJax has typeset:

* raw TeX left in the rendered text (``$...$``, ``\\(``, ``\\[`` outside code) and formulas MathJax
  marks as errors (unknown macros show red), against the formulas typeset;
* JavaScript errors (uncaught exceptions, console errors, failed loads) and requests to any host
  other than the local server;
* ``<img>`` elements that did not load;
* widget outputs left empty (a widget view that no script rendered);
* internal links whose page, or ``#anchor`` on that page, does not exist;
* library noise printed into cell outputs (matplotlib's ``findfont`` fallbacks).

It prints one line per page and a total, saves a screenshot of one chapter next to the HTML folder
(``_build/browser_check.png``) and exits 1 on any problem. It talks to Chromium over the DevTools
protocol with ``websocket-client`` (the ``book`` extra); Chromium is Debian's ``chromium`` package.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import websocket

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--window-size=1280,1600",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         # nothing but the local server: a page that needs the network shows it here
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
# Console messages that are no fault of the page: the theme's note on a fresh profile with no stored
# light/dark choice, and the favicon Chromium asks every server for (the book has none).
BENIGN = re.compile(r"Got invalid theme mode: \. Resetting to auto|/favicon\.ico$")
SKIP_DIRS = {"_static", "_sources", "_images", "_sphinx_design_static", "_panels_static"}

# Runs in the page after the load event: wait for MathJax's first typeset, load lazy images, then
# report what a reader sees. Returns a JSON-able object.
PAGE_JS = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const hasMath = () => document.querySelector('.math, mjx-container, script[type^="math/tex"]');
  let mathjax = 'absent';
  for (let i = 0; i < 200 && hasMath(); i++) {          // up to 20 s for MathJax to start
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) break;
    await sleep(100);
  }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise; mathjax = 'typeset';
  } else if (hasMath()) { mathjax = 'never started'; }
  for (const img of document.images) {
    if (!img.complete) {
      img.loading = 'eager';
      await Promise.race([img.decode().catch(() => null), sleep(10000)]);
    }
  }
  const images = [...document.images].map(img => ({src: img.currentSrc || img.src,
    ok: img.complete && img.naturalWidth > 0}));
  const formulas = document.querySelectorAll('mjx-container').length;
  const texErrors = [...document.querySelectorAll('mjx-merror, mjx-container [style*="color: red"]')]
    .map(e => (e.closest('mjx-container') || e).getAttribute('aria-label') || e.textContent).slice(0, 5);
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight, ' +
                        'mjx-assistive-mml').forEach(e => e.remove());
  const text = body.textContent;
  const raw = [];
  for (const re of [/\$[^$\n]{1,200}\$/g, /\\\(/g, /\\\[/g]) {
    for (const m of text.matchAll(re)) raw.push(text.slice(Math.max(0, m.index - 20), m.index + 40));
  }
  const widgets = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
  const emptyWidgets = widgets.filter(s => {
    const box = s.parentElement;
    return ![...box.children].some(c => c !== s && c.getBoundingClientRect().height > 0);
  }).length;
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return {mathjax, formulas, texErrors, raw: raw.slice(0, 5), rawCount: raw.length, images,
          widgets: widgets.length, emptyWidgets, links};
})()
"""


class CDP:
    """A minimal DevTools protocol client over one WebSocket (flattened target sessions)."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["method"] == method for e in self.events):
                return True
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
        self.ws.settimeout(60)
        return any(e["method"] == method for e in self.events)


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A quiet static server on 127.0.0.1 (a free port) in a daemon thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"


def start_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    for _ in range(600):
        if port_file.exists() and len(port_file.read_text().split()) >= 2:
            port, path = port_file.read_text().split()[:2]
            return proc, f"ws://127.0.0.1:{port}{path}"
        if proc.poll() is not None:
            raise RuntimeError(f"{binary} exited with {proc.returncode} before opening DevTools")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{binary} opened no DevTools port in 60 s")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(html.unescape(m) for m in re.findall(r'\b(?:id|name)="([^"]+)"', text))


def broken_links(links: list[str], base: str, root: Path) -> list[str]:
    """Internal links (to the local server) whose file or #anchor does not exist."""
    bad = []
    for link in dict.fromkeys(links):
        if not link.startswith(base):
            continue
        parts = urllib.parse.urlsplit(link)
        rel = urllib.parse.unquote(parts.path)[1:]
        target = root / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(link[len(base):])
        elif parts.fragment and target.suffix == ".html" and \
                urllib.parse.unquote(parts.fragment) not in anchors(target):
            bad.append(link[len(base):])
    return bad


#: lines a library prints into a cell's output that a reader should never see
NOISE = re.compile(r"findfont: Font family \[[^\]]*\] not found")


def problems_of(events: list[dict], base: str) -> tuple[list[str], list[str]]:
    """JavaScript errors and requests that left the local server, from the page's events."""
    errors, external = [], []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append((d.get("exception", {}).get("description") or d.get("text", "")).split("\n")[0])
        elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}".strip())
        elif m == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not url.startswith((base, "data:", "blob:", "about:")):
                external.append(url)
    return [e for e in errors if not BENIGN.search(e)], external


def check(root: Path, binary: str, shot_page: str | None, shot_out: Path, timeout: float) -> int:
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts))
    if not pages:
        print(f"browser check: no HTML pages under {root}")
        return 1
    shot_page = shot_page or next((p for p in pages if re.match(r"book/0[1-9]_", p)), pages[0])
    httpd, base = serve(root)
    profile = Path(tempfile.mkdtemp(prefix="nclab-chromium-"))
    proc, ws_url = start_chromium(binary, profile)
    totals = dict(pages=0, formulas=0, images=0, links=0, failed_pages=0)
    try:
        cdp = CDP(ws_url)
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            cdp.send(f"{domain}.enable", session=sid)
        for page in pages:
            redirect = re.search(r'http-equiv="refresh" content="\d+;\s*url=([^"]+)"',
                                 (root / page).read_text(encoding="utf-8", errors="replace"), re.I)
            if redirect:  # index.html: a meta refresh to the first page, no content of its own
                target = urllib.parse.urljoin(base + page, html.unescape(redirect.group(1)))
                bad = broken_links([target], base, root)
                print(f"{'FAIL' if bad else 'ok  '} {page}: redirects to {target[len(base):]}"
                      + (" -- the target does not exist" if bad else ""))
                totals["pages"] += 1
                totals["failed_pages"] += bool(bad)
                continue
            cdp.events.clear()
            cdp.send("Page.navigate", {"url": base + page}, session=sid)
            loaded = cdp.wait_for("Page.loadEventFired", timeout)
            res = cdp.send("Runtime.evaluate", {"expression": PAGE_JS, "awaitPromise": True,
                                                "returnByValue": True}, session=sid, timeout=timeout)
            if "exceptionDetails" in res:
                raise RuntimeError(f"{page}: the check's own script failed: {res['exceptionDetails']}")
            r = res["result"]["value"]
            errors, external = problems_of(cdp.events, base)
            bad_img = [i["src"] for i in r["images"] if not i["ok"]]
            bad_links = broken_links(r["links"], base, root)
            problems = []
            if not loaded:
                problems.append(f"no load event in {timeout:.0f} s")
            if r["mathjax"] == "never started":
                problems.append("MathJax never started")
            if r["rawCount"]:
                problems.append(f"{r['rawCount']} raw TeX {r['raw']}")
            if r["texErrors"]:
                problems.append(f"{len(r['texErrors'])} TeX errors {r['texErrors']}")
            if errors:
                problems.append(f"{len(errors)} JS errors {errors[:3]}")
            if external:
                problems.append(f"{len(external)} requests off this machine {sorted(set(external))[:3]}")
            if bad_img:
                problems.append(f"{len(bad_img)} images not loaded {bad_img[:3]}")
            if r["emptyWidgets"]:
                problems.append(f"{r['emptyWidgets']} of {r['widgets']} widget outputs empty")
            if bad_links:
                problems.append(f"{len(bad_links)} broken internal links {bad_links[:3]}")
            noise = NOISE.findall((root / page).read_text(encoding="utf-8", errors="replace"))
            if noise:
                problems.append(f"{len(noise)} library warnings in cell outputs {sorted(set(noise))[:2]}")
            internal = sum(1 for link in set(r["links"]) if link.startswith(base))
            print(f"{'FAIL' if problems else 'ok  '} {page}: {r['formulas']} formulas typeset, "
                  f"{len(r['images'])} images, {r['widgets']} widgets, {internal} internal links"
                  + (" -- " + "; ".join(problems) if problems else ""), flush=True)
            totals["pages"] += 1
            totals["formulas"] += r["formulas"]
            totals["images"] += len(r["images"])
            totals["links"] += internal
            totals["failed_pages"] += bool(problems)
            if page == shot_page:
                cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1600,
                                                                "deviceScaleFactor": 1, "mobile": False},
                         session=sid)
                png = cdp.send("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]
                shot_out.parent.mkdir(parents=True, exist_ok=True)
                shot_out.write_bytes(base64.b64decode(png))
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        httpd.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"browser check: {totals['pages']} pages, {totals['formulas']} formulas typeset, "
          f"{totals['images']} images, {totals['links']} internal links; "
          f"{totals['failed_pages']} page(s) with problems; screenshot of {shot_page}: {shot_out}")
    return 1 if totals["failed_pages"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("html", nargs="?", type=Path, default=Path("_build/html"))
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    p.add_argument("--screenshot", default=None, help="page to screenshot (default: chapter 01)")
    p.add_argument("--screenshot-out", type=Path, default=None,
                   help="PNG file (default: browser_check.png beside the HTML folder)")
    p.add_argument("--timeout", type=float, default=60, help="seconds per page")
    args = p.parse_args(argv)
    binary = shutil.which(args.chromium)
    if binary is None:
        print(f"browser check: {args.chromium} not found (apt-get install chromium)")
        return 1
    root = args.html.resolve()
    out = args.screenshot_out or root.parent / "browser_check.png"
    return check(root, binary, args.screenshot, out, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
