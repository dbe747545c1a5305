"""A headless Chromium driven over the DevTools protocol, with the network off: open local pages, record every
request that fails or leaves the machine, and evaluate JavaScript in the page. Used by the docs test."""
import json, re, shutil, subprocess, tempfile, time

import websocket

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class OfflineBrowser:
    "One Chromium process; `visit(url)` loads a page and returns the requests that failed or went off the machine."
    def __init__(self, width=1280, height=900):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-port=0",
             # any request that is not to the loopback goes to a dead proxy: the network is off for the page
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
             f"--window-size={width},{height}", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url, t0 = None, time.time()
        while url is None and time.time() - t0 < 30:
            line = self.proc.stderr.readline()
            if m := re.search(r"DevTools listening on (ws://\S+)", line): url = m[1]
        if url is None: raise RuntimeError("chromium did not start its DevTools endpoint")
        self.ws = websocket.create_connection(url, timeout=60)
        self.id, self.events = 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for m in ("Page.enable", "Network.enable", "Runtime.enable"): self.call(m, session=True)
        self.call("Network.emulateNetworkConditions", session=True, offline=True, latency=0,
                  downloadThroughput=-1, uploadThroughput=-1)

    def call(self, method, session=False, **params):
        self.id += 1; msg = {"id": self.id, "method": method, "params": params}
        if session: msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            r = json.loads(self.ws.recv())
            if r.get("id") == self.id:
                if "error" in r: raise RuntimeError(f"{method}: {r['error']}")
                return r.get("result", {})
            self.events.append(r)

    def _drain(self, seconds):
        self.ws.settimeout(seconds)
        try:
            while True: self.events.append(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException: pass
        finally: self.ws.settimeout(60)

    def eval(self, expr, await_promise=False):
        r = self.call("Runtime.evaluate", session=True, expression=expr, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in r: raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def _drain_until_quiet(self, quiet, limit):
        "Collect events until none arrives for `quiet` seconds (or `limit` seconds pass)."
        t0 = time.time()
        while time.time() - t0 < limit:
            n = len(self.events); self._drain(quiet)
            if len(self.events) == n: break

    def visit(self, url, ready=None, quiet=0.3, timeout=15):
        """Load `url`, wait for MathJax, for the network to go quiet and, if given, for the JavaScript expression
        `ready` to be true (polled up to `timeout` s); returns a list of bad requests."""
        self.events = []
        self.call("Page.navigate", session=True, url=url)
        t0 = time.time()
        while time.time() - t0 < 30:
            if any(e.get("method") == "Page.loadEventFired" for e in self.events): break
            self._drain(0.2)
        self.eval("window.MathJax && MathJax.startup && MathJax.startup.promise ? "
                  "MathJax.startup.promise.then(() => true) : true", await_promise=True)
        self._drain_until_quiet(quiet, timeout)
        t1 = time.time()
        while ready and not self.eval(ready) and time.time() - t1 < timeout: self._drain(0.2)
        self._drain_until_quiet(quiet, timeout)
        reqs = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in self.events if e.get("method") == "Network.requestWillBeSent"}
        bad = [f"failed: {reqs.get(e['params']['requestId'], '?')} ({e['params'].get('errorText')})"
               for e in self.events if e.get("method") == "Network.loadingFailed"]
        bad += [f"off the machine: {u}" for u in reqs.values() if not u.startswith(("file:", "data:", "blob:", "about:"))]
        return sorted(set(bad))

    def screenshot(self, path, selector=None):
        "Save a PNG of the viewport, scrolled to the first element matching `selector` if given."
        import base64
        if selector: self.eval(f"document.querySelector({json.dumps(selector)}).scrollIntoView()")
        self._drain(0.5)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        with open(path, "wb") as f: f.write(base64.b64decode(data))

    def close(self):
        try: self.ws.close()
        finally:
            self.proc.terminate(); self.proc.wait(10); shutil.rmtree(self.profile, ignore_errors=True)
