"""Real-browser check of the tutorial notebooks: `make test-browser`.

Serves a temporary copy of ``notebooks/`` (outputs stripped, so the committed executed
notebooks stay untouched) with JupyterLab on 127.0.0.1 (free port, random token, private
Jupyter config/data/runtime dirs, a ``python3`` kernelspec pointing at this interpreter),
then for every ``notebooks/*.ipynb`` opens it in Debian's chromium through Playwright
(never a downloaded browser), runs all cells, waits until the kernel is idle and every code
cell has an execution count, fails on any error output, moves the first ipywidgets slider
(if any) and checks that the widget redrew, and saves ``build/screenshots/<notebook>.png``.
The server it started is always stopped. Exit status 1 on any failure.

Run it with the project venv's python (the kernel is that python):
``.venv/bin/python tools/browser_check.py [notebooks/01_quickstart.ipynb ...]``.
Not a pytest module: nothing here is collected by ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

# Lab settings for a deterministic, offline page: every cell in the DOM (no windowing, so
# the prompts and outputs of all cells can be read and the screenshot shows them all; no
# blank space past the last cell), no
# news / update checks (no network), no autosave into the temporary copy.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {
        "windowingMode": "none",
        "scrollPastEnd": False,
    },
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}

# Reads the open notebook through the JupyterLab app (exposed with --expose-app-in-browser).
STATE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model || !panel.sessionContext) return null;
  const ctx = panel.sessionContext;
  const cells = [];
  const model = panel.content.model;
  for (let i = 0; i < model.cells.length; i++) {
    const cell = model.cells.get(i);
    if (cell.type !== 'code') continue;
    const errors = [];
    for (let j = 0; j < cell.outputs.length; j++) {
      const out = cell.outputs.get(j).toJSON();
      if (out.output_type === 'error') errors.push(out.ename + ': ' + out.evalue);
    }
    cells.push({index: i, count: cell.executionCount, errors: errors,
                source: cell.sharedModel.getSource().split('\\n')[0].slice(0, 80)});
  }
  const kernel = ctx.session && ctx.session.kernel;
  return {status: ctx.kernelDisplayStatus, kernel: kernel ? kernel.name : null,
          display: ctx.kernelDisplayName, cells: cells};
}"""

# Error output as rendered: an exception's traceback, or a traceback printed to stderr.
DOM_ERRORS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
  .map(e => e.innerText).filter(t => /Traceback/.test(t))
  .map(t => t.slice(0, 600))"""

# What a slider's widget shows besides its controls: images (blob URLs change on redraw),
# HTML/text/output widgets; the sliders' own readouts are left out.
WIDGET_VIEW_JS = """(slider) => {
  const area = slider.closest('.jp-OutputArea-output') || slider.closest('.jp-OutputArea');
  const clone = area.cloneNode(true);
  clone.querySelectorAll('.widget-slider, .widget-readout, .widget-dropdown, .widget-text, input, select')
    .forEach(e => e.remove());
  const imgs = Array.from(area.querySelectorAll('img')).map(i => i.src.slice(0, 200));
  return {html: clone.innerHTML, imgs: imgs, text: clone.innerText};
}"""


class CheckError(Exception):
    """One notebook failed; the message names the problem."""


def log(message: str) -> None:
    print(f"[browser-check] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium(explicit: str | None) -> str:
    for candidate in [explicit, os.environ.get("CHROMIUM"), "/usr/bin/chromium"]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium")
    if found:
        return found
    raise SystemExit(
        "browser-check: Debian's chromium is missing (as root: apt-get install chromium); "
        "`make test-browser` installs it when run as root"
    )


def prepare_notebooks(source: Path, names: list[Path], dest: Path) -> list[Path]:
    """Copy the notebooks dir to `dest`, stripping outputs and execution counts."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    copies = []
    for name in names:
        path = dest / name.name
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"] = []
                cell["execution_count"] = None
        path.write_text(json.dumps(nb, indent=1))
        copies.append(path)
    return copies


class LabServer:
    """JupyterLab on 127.0.0.1, isolated from the user's Jupyter config; stop() always."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.home = root, home
        self.port = free_port()
        self.token = secrets.token_hex(24)
        self.proc: subprocess.Popen | None = None
        self.logfile = home / "jupyterlab.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        dirs = {k: self.home / k.lower() for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR")}
        dirs["JUPYTER_RUNTIME_DIR"] = self.home / "runtime"
        for key, path in dirs.items():
            path.mkdir(parents=True, exist_ok=True)
            env[key] = str(path)
        # Our data dir (with the kernelspec below) before any other Jupyter path.
        env["JUPYTER_PREFER_ENV_PATH"] = "0"
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        kernel = dirs["JUPYTER_DATA_DIR"] / "kernels" / "python3"
        kernel.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (cortexlab venv)",
            "language": "python",
            "metadata": {"debugger": False},
        }
        (kernel / "kernel.json").write_text(json.dumps(spec, indent=1))
        settings = self.home / "lab-settings"
        for plugin, values in LAB_SETTINGS.items():
            package, name = plugin.rsplit("/", 1)
            path = settings / package / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        return env

    def start(self, timeout: float) -> None:
        env = self._env()
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--expose-app-in-browser",
            f"--LabApp.user_settings_dir={self.home / 'lab-settings'}",
            f"--LabApp.workspaces_dir={self.home / 'workspaces'}",
            "--ServerApp.allow_root=True",  # CI runs as root; the server is local-only
            "--LabApp.extension_manager=readonly",  # no PyPI queries from the page
            "--ServerApp.terminals_enabled=False",
        ]  # fmt: skip
        log(f"starting JupyterLab on {self.url} (root {self.root})")
        self.out = open(self.logfile, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"browser-check: JupyterLab exited at start:\n{self.tail()}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise SystemExit(f"browser-check: JupyterLab not up after {timeout:.0f} s:\n{self.tail()}")

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        try:
            for session in self.api("GET", "/api/sessions"):
                self.api("DELETE", f"/api/sessions/{session['id']}")
        except Exception as exc:  # the server may already be gone
            log(f"could not shut kernels down over the API: {exc}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.shutdown_kernels()
        try:
            self.api("POST", "/api/shutdown")  # shuts its kernels down, then exits
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()
        log("JupyterLab stopped")


def wait_for(page, predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll `predicate()` until it returns a truthy value; CheckError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckError(f"timed out after {timeout:.0f} s waiting for {what}")
        page.wait_for_timeout(poll * 1000)


def accept_kernel_dialog(page) -> bool:
    """A notebook whose kernel is unknown opens 'Select Kernel': accept the proposed one."""
    from playwright.sync_api import Error as PlaywrightError

    dialog = page.locator(".jp-Dialog")
    try:
        if dialog.count() and dialog.first.is_visible():
            title = (dialog.first.inner_text(timeout=2000).strip().splitlines() or [""])[0]
            log(f"  dialog {title!r}: accepting")
            dialog.locator(".jp-mod-accept").first.click(timeout=5000)
            return True
    except PlaywrightError:  # it closed by itself between the checks: poll again
        pass
    return False


def kernel_ready(page):
    accept_kernel_dialog(page)
    state = page.evaluate(STATE_JS)
    return state if state and state["kernel"] and state["status"] == "idle" else None


def run_all(page, timeout: float) -> dict:
    # Not awaited: the command's promise settles only when the last cell has run.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    deadline = time.monotonic() + timeout
    while True:
        state = page.evaluate(STATE_JS)
        failed = [c for c in state["cells"] if c["errors"]]
        if failed:
            cell = failed[0]
            raise CheckError(
                f"cell {cell['index']} ({cell['source']!r}) raised {'; '.join(cell['errors'])}"
            )
        dom_errors = page.evaluate(DOM_ERRORS_JS)
        if dom_errors:
            raise CheckError(f"a cell printed a traceback:\n{dom_errors[0]}")
        missing = [c for c in state["cells"] if c["count"] is None]
        if not missing and state["status"] == "idle":
            return state
        if time.monotonic() > deadline:
            names = ", ".join(f"cell {c['index']} ({c['source']!r})" for c in missing[:3])
            raise CheckError(
                f"not done after {timeout:.0f} s: kernel {state['status']}, "
                f"{len(missing)} code cell(s) without an execution count, e.g. {names}"
            )
        page.wait_for_timeout(1000)


def idle(page) -> bool:
    state = page.evaluate(STATE_JS)
    return bool(state and state["status"] == "idle")


def move_slider(page, timeout: float) -> str | None:
    """Drag the first ipywidgets slider; require the widget's view to change. None: no slider."""
    sliders = page.locator(".jp-Notebook .widget-slider")
    if sliders.count() == 0:
        return None
    slider = sliders.first
    slider.scroll_into_view_if_needed()
    labels = slider.locator(".widget-label")
    label = (labels.first.inner_text().strip() if labels.count() else "") or "(unlabelled)"
    readout = slider.locator(".widget-readout").first
    handle = slider.locator(".noUi-handle, .ui-slider-handle").first
    track = slider.locator(".noUi-target, .ui-slider").first
    before_value = readout.inner_text() if readout.count() else readout.input_value()
    before = slider.evaluate(WIDGET_VIEW_JS)
    hbox, tbox = handle.bounding_box(), track.bounding_box()
    x, y = hbox["x"] + hbox["width"] / 2, hbox["y"] + hbox["height"] / 2
    # Towards the side with more room, a quarter of the track.
    dx = tbox["width"] / 4 * (1 if x < tbox["x"] + tbox["width"] / 2 else -1)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y, steps=5)
    page.mouse.move(x + dx, y, steps=5)
    page.mouse.up()

    def value_now():
        return readout.inner_text() if readout.count() else ""

    def moved():
        return value_now() != before_value

    how = "dragged"
    try:
        wait_for(page, moved, 5, "the slider value to change", poll=0.2)
    except CheckError:  # drag did not take: the keyboard then
        how = "moved with arrow keys"
        handle.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight" if dx > 0 else "ArrowLeft")
        wait_for(page, moved, 5, f"slider {label!r} to move (mouse drag and arrow keys)")
    after_value = value_now()

    def redrawn():
        view = slider.evaluate(WIDGET_VIEW_JS)
        return view if view["html"] != before["html"] and idle(page) else None

    try:
        after = wait_for(page, redrawn, timeout, "the widget to redraw", poll=1)
    except CheckError as exc:
        raise CheckError(
            f"slider {label!r} moved {before_value} -> {after_value} but its widget did not "
            f"change ({exc})"
        ) from None
    # Let the kernel finish any follow-up update, then let the view settle.
    wait_for(page, lambda: idle(page), timeout, "the kernel to go idle after the slider")
    page.wait_for_timeout(1000)
    images = sum(a != b for a, b in zip(before["imgs"], after["imgs"], strict=False))
    texts = "text changed" if before["text"] != after["text"] else "text unchanged"
    return (
        f"slider {label!r} {how} {before_value} -> {after_value}: "
        f"{images} image(s) redrawn, {texts}"
    )


# How far the last cell reaches below the notebook's visible area (px; <= 0: all visible).
HIDDEN_JS = """() => {
  const nb = document.querySelector('.jp-NotebookPanel-notebook');
  if (!nb) return 0;
  const scroller = nb.querySelector('.jp-WindowedPanel-outer') || nb;
  const cells = nb.querySelectorAll('.jp-Cell');
  if (!cells.length) return 0;
  scroller.scrollTop = 0;
  const bottom = cells[cells.length - 1].getBoundingClientRect().bottom;
  return Math.ceil(bottom - scroller.getBoundingClientRect().bottom);
}"""


def screenshot(page, path: Path, max_height: int = 16000) -> None:
    """The whole notebook: grow the viewport until the last cell shows, then a PNG."""
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    for _ in range(4):  # plots and widgets may reflow at the new size: measure again
        hidden = page.evaluate(HIDDEN_JS)
        if hidden <= 0 or height >= max_height:
            break
        height = min(height + int(hidden) + 24, max_height)
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(1000)
    page.evaluate(HIDDEN_JS)  # scrolled to the top
    page.wait_for_timeout(300)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": 900})


def check_notebook(browser, server: LabServer, copy: Path, args) -> dict:
    name = copy.stem
    result = {"notebook": copy.name, "ok": False, "problem": "", "times": {}, "slider": None}
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    console_errors: list[str] = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    t0 = time.monotonic()
    try:
        rel = copy.relative_to(server.root).as_posix()
        page.goto(f"{server.url}/lab/tree/{rel}?reset&token={server.token}")
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        page.evaluate(
            "() => { const s = window.jupyterapp.shell; s.collapseLeft && s.collapseLeft(); }"
        )
        state = wait_for(page, lambda: kernel_ready(page), args.kernel_timeout, "an idle kernel")
        log(f"  kernel {state['kernel']!r} ({state['display']}), {len(state['cells'])} code cells")
        t1 = time.monotonic()
        result["times"]["open"] = t1 - t0
        run_all(page, args.run_timeout)
        t2 = time.monotonic()
        result["times"]["run"] = t2 - t1
        log(f"  ran all cells in {t2 - t1:.1f} s")
        result["slider"] = move_slider(page, args.widget_timeout)
        if result["slider"]:
            result["times"]["slider"] = time.monotonic() - t2
            log(f"  {result['slider']} ({result['times']['slider']:.1f} s)")
        else:
            log("  no ipywidgets slider")
        dom_errors = page.evaluate(DOM_ERRORS_JS)
        if dom_errors:
            raise CheckError(f"a traceback was printed:\n{dom_errors[0]}")
        result["ok"] = True
    except CheckError as exc:
        result["problem"] = str(exc)
    except Exception as exc:  # Playwright / page errors: report them per notebook too
        result["problem"] = f"{type(exc).__name__}: {exc}"
    finally:
        shot = args.screenshots / f"{name}.png"
        try:
            screenshot(page, shot)
            result["screenshot"] = shot
        except Exception as exc:
            log(f"  no screenshot: {exc}")
        try:
            page.evaluate(
                "() => { const p = window.jupyterapp.shell.currentWidget;"
                " return p && p.sessionContext && p.sessionContext.shutdown(); }"
            )
        except Exception:
            pass
        context.close()
        result["times"]["total"] = time.monotonic() - t0
    if console_errors and not result["ok"]:
        result["problem"] += f"\n  page errors: {console_errors[:3]}"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--chromium", help="default: $CHROMIUM, /usr/bin/chromium, PATH")
    parser.add_argument("--screenshots", type=Path, default=ROOT / "build" / "screenshots")
    parser.add_argument("--run-timeout", type=float, default=600, help="per notebook, s")
    parser.add_argument("--kernel-timeout", type=float, default=120)
    parser.add_argument("--widget-timeout", type=float, default=180)
    parser.add_argument("--headed", action="store_true", help="show the browser (needs X)")
    args = parser.parse_args(argv)

    source = ROOT / "notebooks"
    names = [p.resolve() for p in args.notebooks] or sorted(source.glob("*.ipynb"))
    if not names:
        log("no notebooks/*.ipynb: nothing to check")
        return 0
    outside = [p for p in names if p.parent != source]
    if outside:
        raise SystemExit(f"browser-check: only notebooks in {source} are checked: {outside}")
    chromium = find_chromium(args.chromium)
    from playwright.sync_api import sync_playwright  # the `browser` extra

    start = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="cortexlab-browser-") as tmp:
        tmp = Path(tmp)
        copies = prepare_notebooks(source, names, tmp / "notebooks")
        server = LabServer(tmp / "notebooks", tmp / "home")

        def stop_on_signal(signum, _frame):
            raise SystemExit(f"browser-check: interrupted by signal {signum}")

        previous = signal.signal(signal.SIGTERM, stop_on_signal)
        try:
            server.start(timeout=120)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=chromium,
                    headless=not args.headed,
                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
                )
                log(f"chromium {browser.version} ({chromium})")
                try:
                    for copy in copies:
                        log(f"{copy.name}: opening")
                        result = check_notebook(browser, server, copy, args)
                        results.append(result)
                        status = "ok" if result["ok"] else "FAILED"
                        log(
                            f"{copy.name}: {status} in {result['times']['total']:.1f} s"
                            + (f": {result['problem']}" if result["problem"] else "")
                        )
                        server.shutdown_kernels()
                finally:
                    browser.close()
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)

    total = time.monotonic() - start
    print("\nbrowser check of the notebooks (JupyterLab in chromium):")
    for r in results:
        t = r["times"]
        parts = [f"run {t['run']:.1f} s" if "run" in t else "not run"]
        if "slider" in t:
            parts.append(f"slider {t['slider']:.1f} s")
        status = "ok    " if r["ok"] else "FAILED"
        shot = r.get("screenshot")
        where = shot.relative_to(ROOT) if shot and shot.is_relative_to(ROOT) else shot
        print(f"  {status} {r['notebook']:<28} {t['total']:6.1f} s ({', '.join(parts)})  {where}")
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"\nFAILED {r['notebook']}: {r['problem']}")
    print(f"\n{len(results) - len(failed)}/{len(results)} notebooks ok, total {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("browser-check: interrupted", file=sys.stderr)
        sys.exit(130)
