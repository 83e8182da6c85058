#!/usr/bin/env python3
"""Real-browser test of `derm serve`: headless Chromium loads the page from a server started
here, uploads a phantom, waits for the results and checks the rendered images and
probabilities, then a bad upload, then the run browser. Chromium is driven through the Chrome
DevTools protocol over --remote-debugging-pipe (file descriptors 3 and 4), so only the Python
standard library is needed.

Run it through scripts/serve_browser_test.sh, which installs Chromium and builds derm.
"""

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

SEED = ["-q", "--seed", "3"]


def log(msg):
    print(f"[browser-test] {msg}", flush=True)


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)
    log(f"ok: {msg}")


def derm(binary, *args):
    r = subprocess.run([binary, *SEED, *args], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise Failure(f"derm {' '.join(args)} failed: {r.stderr}")


def tiny_run(binary, d):
    """Phantoms and small models trained on them (about 30 s on 2 cores), laid out as a pipeline
    run folder."""
    ph, run = os.path.join(d, "ph"), os.path.join(d, "run")
    derm(binary, "phantom", "--count", "48", "--size", "192", "--balanced", "--out", ph)
    seg = os.path.join(run, "segment/model")
    derm(binary, "segment", "train", "--root", ph, "--size", "64", "--epochs", "15", "--batch", "4", "--lr", "0.003",
         "--out", seg)
    derm(binary, "purify", "train", "--root", ph, "--size", "64", "--epochs", "5", "--batch", "4",
         "--out", os.path.join(run, "purify/model"))
    derm(binary, "classify", "train", "--root", ph, "--arch", "resnet18", "--width", "8", "--size", "64",
         "--epochs", "10", "--batch", "4", "--lr", "0.003", "--optimizer", "adam",
         "--out", os.path.join(run, "classify/both"))
    derm(binary, "segment", "eval", "--model", seg, "--root", ph, "--out", os.path.join(run, "segment/eval"))
    derm(binary, "segment", "predict", "--model", seg, "--input", os.path.join(ph, "images"),
         "--out", os.path.join(run, "segment/test_masks"))
    os.makedirs(os.path.join(run, "data"), exist_ok=True)
    os.symlink(ph, os.path.join(run, "data/test"))
    return run, ph


class Cdp:
    """Chrome DevTools protocol over the debugging pipe: NUL-terminated JSON messages."""

    def __init__(self, chromium, profile_dir):
        # Chromium reads commands from fd 3 and writes answers to fd 4. The child's ends are
        # first moved to high, close-on-exec numbers so that placing them at 3 and 4 cannot
        # overwrite one with the other; close_fds stays off so that 3 and 4 survive until exec.
        to_chrome_r, self.to_chrome_w = os.pipe()
        self.from_chrome_r, from_chrome_w = os.pipe()
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", "--window-size=1280,1060",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=child_fds, close_fds=False)
        os.close(hi_r)
        os.close(hi_w)
        self.buf = b""
        self.next_id = 0
        self.events = []

    def _read_message(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise Failure("no answer from chromium in time")
            r, _, _ = select.select([self.from_chrome_r], [], [], left)
            if r:
                chunk = os.read(self.from_chrome_r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                    raise Failure(f"chromium closed the debugging pipe {err[-2000:]}")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=None, timeout=60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise Failure(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Page:
    def __init__(self, cdp):
        self.cdp = cdp
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 1060, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method, params=None, timeout=60):
        return self.cdp.send(method, params, session=self.session, timeout=timeout)

    def eval(self, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise Failure(f"script error in {expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr, what, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.eval(expr)
            if v:
                return v
            time.sleep(0.2)
        raise Failure(f"timed out waiting for {what}")

    def set_file(self, selector, path):
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise Failure(f"no element {selector}")
        self.send("DOM.setFileInputFiles", {"files": [path], "nodeId": node})

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        log(f"screenshot: {path}")


IMAGES_OK = """(() => {
  const imgs = [...document.querySelectorAll('#outputs img'), document.getElementById('cmp-before'), document.getElementById('cmp-after')];
  return imgs.length === 7 && imgs.every(i => i.complete && i.naturalWidth > 0);
})()"""

RESULT = """(() => ({
  outputs: [...document.querySelectorAll('#outputs img')].map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width})),
  probs: [...document.querySelectorAll('#probs li')].map(li => ({cls: li.dataset.class, value: Number(li.querySelector('.value').textContent), best: li.classList.contains('best'), bar: li.querySelector('.bar span').getBoundingClientRect().width})),
  predicted: document.getElementById('predicted').textContent,
  downloads: [...document.querySelectorAll('#downloads a')].map(a => a.getAttribute('href')),
  status: document.getElementById('status').textContent,
  errorHidden: document.getElementById('error').hidden,
  resultsHidden: document.getElementById('results').hidden,
}))()"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--derm", required=True)
    ap.add_argument("--chromium", required=True)
    ap.add_argument("--screenshot", required=True, help="PNG of the page after an analysis")
    ap.add_argument("--run-screenshot", help="PNG of the run browser")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="derm-browser-")
    server = cdp = None
    try:
        log("training a tiny phantom run")
        run, ph = tiny_run(a.derm, work)
        server = subprocess.Popen([a.derm, "serve", "--models", run, "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r, _, _ = select.select([server.stdout], [], [], 60)
        if not r:
            raise Failure("derm serve printed no address within 60 s")
        url = server.stdout.readline().strip()
        check(url.startswith("http://127.0.0.1:"), f"derm serve listens on loopback: {url}")

        cdp = Cdp(a.chromium, os.path.join(work, "profile"))
        version = cdp.send("Browser.getVersion")
        log(f"browser: {version.get('product')}")
        page = Page(cdp)
        page.send("Page.navigate", {"url": url})
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')", "the page")
        page.wait_for("document.getElementById('info').textContent.includes('classes')", "the server info")
        check(page.eval("document.title") == "derm serve", "the page loads")

        # An analysis: choose a phantom in the file picker.
        # The phantom with the most hair and ruler pixels among the first twelve (the largest
        # occlusion mask file): the page then shows what purification does.
        ids = sorted(f[:-4] for f in os.listdir(os.path.join(ph, "images")) if f.endswith(".png"))[:12]
        occ = os.path.join(ph, "occlusion")
        pick = max(ids, key=lambda i: os.path.getsize(os.path.join(occ, i + "_occlusion.png"))
                   if os.path.exists(os.path.join(occ, i + "_occlusion.png")) else 0)
        image = os.path.join(ph, "images", pick + ".png")
        log(f"uploading {pick}")
        page.set_file("#file", image)
        state = page.wait_for("['done','error'].includes(document.body.dataset.state) && document.body.dataset.state",
                              "the analysis")
        res = page.eval(RESULT)
        check(state == "done", f"the analysis finishes ({res['status']})")
        page.wait_for(IMAGES_OK, "every output image to load", timeout=30)
        res = page.eval(RESULT)
        check(not res["resultsHidden"] and res["errorHidden"], "results shown, no error")
        outs = res["outputs"]
        check(len(outs) == 5 and all(o["w"] == 192 and o["h"] > 0 and o["shown"] > 50 for o in outs[:4]),
              f"input, occlusion, purified and lesion outline rendered at 192 px: {[(o['w'], o['h']) for o in outs]}")
        check(outs[4]["w"] > 0, "saliency overlay rendered")
        probs = res["probs"]
        total = sum(p["value"] for p in probs)
        check(len(probs) == 3 and abs(total - 1.0) < 0.01, f"three class probabilities summing to 1: {probs}")
        best = max(probs, key=lambda p: p["value"])
        check(best["best"] and best["cls"].replace("_", " ") in res["predicted"],
              f"the most probable class is highlighted and named: {res['predicted']}")
        check(len(res["downloads"]) == 8 and any(h.endswith("analysis.json") for h in res["downloads"]),
              "a download for every output and analysis.json")
        # The before/after slider clips the "after" image.
        page.eval("(() => { const r = document.getElementById('cmp-range'); r.value = 30; r.dispatchEvent(new Event('input')); })()")
        clip = page.eval("document.getElementById('cmp-after').style.clipPath")
        check("70%" in clip, f"the before/after slider moves the split: {clip}")
        page.eval("(() => { const r = document.getElementById('cmp-range'); r.value = 55; r.dispatchEvent(new Event('input')); })()")
        page.screenshot(a.screenshot)

        # The same image through the API answers the same probabilities.
        js = page.eval("""(async () => {
          const b = await (await fetch('%s')).blob();
          const f = new FormData(); f.append('image', b, 'again.png');
          const r = await fetch('/api/analyze', {method: 'POST', body: f});
          return {status: r.status, body: await r.json()};
        })()""" % res["outputs"][0]["src"])
        check(js["status"] == 200, "POST /api/analyze from the page's origin answers 200")
        for p in probs:
            got = js["body"]["probabilities"][p["cls"]]
            check(abs(got - p["value"]) < 2e-3, f"{p['cls']}: API {got:.3f} matches the page {p['value']:.3f}")

        # A bad upload: a clear message on the page, no results.
        bad = os.path.join(work, "not_an_image.png")
        with open(bad, "w") as f:
            f.write("this is a text file, not a PNG\n")
        page.set_file("#file", bad)
        page.wait_for("document.body.dataset.state === 'error'", "the error message")
        msg = page.eval("document.getElementById('error').textContent")
        check("not an image" in msg and "415" in msg, f"a bad upload shows a clear message: {msg!r}")
        check(page.eval("document.getElementById('results').hidden"), "no stale results after a bad upload")

        # Then a good one again: the page recovers.
        page.set_file("#file", os.path.join(ph, "images", "phantom_3_000007.png"))
        page.wait_for("document.body.dataset.state === 'done'", "the second analysis")
        check(page.eval("document.getElementById('error').hidden"), "the error clears on the next analysis")

        # The run browser: segmentation worst first, with overlays.
        page.eval("document.getElementById('tab-run').click()")
        page.wait_for("document.querySelectorAll('#seg-table tr').length > 1", "the segmentation table")
        rows = page.eval("[...document.querySelectorAll('#seg-table tr')].slice(1).map(r => Number(r.children[2].textContent))")
        check(len(rows) == 12 and rows == sorted(rows), f"segmentation results worst Jaccard first: {rows[:5]}…")
        page.wait_for("[...document.querySelectorAll('#seg-table img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)",
                      "the overlays", timeout=30)
        check(True, "overlays of the worst images render")
        if a.run_screenshot:
            page.screenshot(a.run_screenshot)
        log("PASS")
        return 0
    except Failure as e:
        log(f"FAIL: {e}")
        return 1
    finally:
        if cdp:
            cdp.close()
        if server:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
