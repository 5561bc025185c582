"""The console page in a real browser: Debian's headless Chromium driven by Selenium against the engine
(tiny model) behind the console, on a generated video file."""

from __future__ import annotations

import shutil

import numpy as np

from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM

from .conftest import chromium, console_engine, skip_unless_ci, wait_for

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)


def test_the_page_shows_streams_answers_and_events(media, tmp_path):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        skip_unless_ci("needs Debian's chromium and chromium-driver (bash scripts/setup.sh --test installs them)")
    from selenium.webdriver.common.by import By

    with console_engine(MALMM.tiny().eval()) as (engine, client, console), chromium(tmp_path / "profile") as browser:
        browser.set_page_load_timeout(30)
        browser.get(console.url)
        assert browser.title == "mixmalmm console"
        wait_for(lambda: browser.execute_script("return document.getElementById('conn').textContent") == "connected",
                 20, "the page's event stream")
        client.add_stream("file", str(media.h264), actionshot=EVERY_FRAME)
        client.add_question("file", "what", "what is happening?", period_s=0.3)

        def card():
            found = browser.find_elements(By.CSS_SELECTOR, '.stream[data-stream="file"]')
            return found[0] if found else None

        wait_for(card, 20, "the stream's card")
        # the thumbnail is the latest Shot, loaded: natural size is the Shot's size
        wait_for(lambda: browser.execute_script(
            "const i = document.querySelector('.stream[data-stream=\"file\"] img');"
            "return i && i.complete && i.naturalWidth > 0"), 30, "the thumbnail")
        size = browser.execute_script(
            "const i = document.querySelector('.stream[data-stream=\"file\"] img'); return [i.naturalWidth, i.naturalHeight]")
        shot = engine._get("file").latest_shot.image
        assert size == [shot.shape[1], shot.shape[0]]

        # events: the state changes and a standing answer reach the timeline
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#timeline li.answer"), 30, "an answer on the timeline")
        types = [li.get_attribute("data-type") for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")]
        assert "stream_state" in types and "answer" in types
        wait_for(lambda: "finished" in card().text, 60, "the file finished, shown on its card")
        assert client.status("file").streams[0].state == "finished"
        wait_for(lambda: "what is happening?" in browser.find_element(By.ID, "standing").text, 10,
                 "the standing question listed")

        # ask: the page shows the answer the ZeroMQ client gets for the same question and memory
        want = client.ask("file", "what colour is the square?")
        box = browser.find_element(By.ID, "question")
        box.send_keys("what colour is the square?")
        browser.find_element(By.ID, "ask").click()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#answer .text"), 60, "the answer")
        shown = browser.find_element(By.CSS_SELECTOR, "#answer .text").text
        assert shown == want.answer and shown
        span = browser.find_element(By.CSS_SELECTOR, "#answer .span").text
        assert span.startswith(f"span {want.span_start_s:.1f} s - {want.span_end_s:.1f} s")

        # the memory contact sheet of the selected stream, loaded
        wait_for(lambda: browser.execute_script(
            "const i = document.getElementById('memory'); return i.complete && i.naturalWidth > 0"), 30,
            "the memory sheet")

        # an alert: a second standing question with the same text (so the same answers, the memory being
        # whole) that fires when the answer is the one the model gives; its first answer fires it
        wait_for(lambda: client.ask("file", "what is happening?").standing, 10, "a standing answer")
        expected = client.ask("file", "what is happening?").answer
        assert expected, "the tiny model said nothing: no answer to match"
        client.add_question("file", "same", "what is happening?", period_s=0.3, alert_when=expected, hold_off_s=600)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#timeline li.alert"), 30, "an alert on the timeline")
        alert = browser.find_element(By.CSS_SELECTOR, "#timeline li.alert")
        assert f"ALERT: {expected}" in alert.text and f'the answer matches "{expected}"' in alert.text
        wait_for(lambda: browser.execute_script(
            "const i = document.querySelector('#timeline li.alert img.evidence_jpeg');"
            "return i && i.complete && i.naturalWidth > 0"), 10, "the alert's evidence picture")
        size = browser.execute_script(
            "const i = document.querySelector('#timeline li.alert img.evidence_jpeg'); return [i.naturalWidth, i.naturalHeight]")
        assert size == [shot.shape[1], shot.shape[0]]  # the last Shot, the same size
        assert browser.execute_script(
            "const i = document.querySelector('#timeline li.alert img.strip_jpeg'); return i !== null")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline li.alert")) == 1  # the same answer: no second alert
        wait_for(lambda: "alert when" in browser.find_element(By.ID, "standing").text, 10, "the alert rule listed")

        path = tmp_path / "console.png"
        assert browser.save_screenshot(str(path))
        import cv2

        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 400 and image.shape[1] > 800
        colours = np.unique(image.reshape(-1, 3) // 16, axis=0)
        assert len(colours) > 20 and image.std() > 20, (len(colours), image.std())
