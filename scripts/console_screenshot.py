"""Take the README's console screenshot (docs/console.png) with Debian's headless Chromium.

Runs `mixmalmm demo --console` on a free loopback port (the built-in model, its sample video), waits for
the demo to finish, opens the console, asks the stream a question on the page and saves the window.

    .venv/bin/python scripts/console_screenshot.py [--out docs/console.png]

Needs chromium, chromium-driver (Debian) and selenium (the test extra): `bash scripts/setup.sh --test`.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: As the browser tests use it (tests/streamer/conftest.py): without the background-networking flags
#: Chromium stalls on refused connections on a machine without a network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/console.png", help="where the PNG goes (default docs/console.png)")
    ap.add_argument("--size", default="1280x1180", help="window WIDTHxHEIGHT in pixels (default 1280x1180: the memory sheet too)")
    ap.add_argument("--question", default="what colour is the square?", help="the question asked on the page")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "demo.log"
        with open(log_path, "w") as log:
            demo = subprocess.Popen(
                [sys.executable, "-m", "mixmalmm.clients.cli", "demo", "--out", f"{tmp}/demo", "--console",
                 "127.0.0.1:0", "--bind", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            url = None
            while url is None:
                if demo.poll() is not None or time.monotonic() > deadline:
                    print(f"console_screenshot: the demo did not start its console:\n{log_path.read_text()}",
                          file=sys.stderr)
                    return 1
                url = next((line.split("console: ", 1)[1] for line in log_path.read_text().splitlines()
                            if line.startswith("console: ")), None)
                time.sleep(0.2)
            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}"):
                options.add_argument(flag)
            browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
            try:
                browser.get(url)  # while the demo plays: its events reach the timeline
                while "still serving" not in log_path.read_text():
                    if demo.poll() is not None or time.monotonic() > deadline:
                        print(f"console_screenshot: the demo failed:\n{log_path.read_text()}", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
                time.sleep(1.5)  # one more refresh of the card: finished, its last Shot
                browser.find_element(By.ID, "question").send_keys(args.question)
                browser.find_element(By.ID, "ask").click()
                end = time.monotonic() + 60
                while not browser.find_elements(By.CSS_SELECTOR, "#answer .text") and time.monotonic() < end:
                    time.sleep(0.2)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(args.out)
            finally:
                browser.quit()
        finally:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
