"""`mixmalmm replay` and `mixmalmm demo` run as a user runs them (subprocesses), on generated video.

Also, in process: the demo's fallback video. (The contact sheet's own tests: test_contact_sheet.py.)
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mixmalmm.clients import Client
from mixmalmm.streamer.contact_sheet import BORDER, THUMB_WIDTH, SheetLayout, thumbnail_height
from mixmalmm.streamer.demo import _offline_shots, scene_sample_video
from mixmalmm.streamer.ingest import DEFAULT_INGEST
from mixmalmm.streamer.replay import progress_bar, show_progress

from .conftest import HEIGHT, SCENE, WIDTH

CLI = [sys.executable, "-m", "mixmalmm.clients.cli"]
HELD_RGB = (40, 205, 90)  # the border of a Shot held in every column (contact_sheet._HELD)


#: One state of replay's progress bar (tqdm): share, bar, seconds of video, time, rate, Shots and frames.
BAR = re.compile(r"replay: +(?P<pct>\d+)%\|[^|]*\| (?P<n>\d+\.\d)/(?P<total>\d+\.\d) s of video "
                 r"\[\d\d:\d\d<(\d\d:\d\d|\?), +(\d+\.\d\d|\?)s/s, Shots=(?P<shots>\d+), frames=(?P<frames>\d+)\]")
SUMMARY = re.compile(r"replayed \d+:\d\d\.\d-\d+:\d\d\.\d of '[^']+': \d+ frames, \d+ Shots in \d+\.\d s "
                     r"\(\d+\.\d frames/s\)")
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) mixmalmm")


def run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def thumb(sheet: np.ndarray, layout: SheetLayout, k: int) -> np.ndarray:
    x, y = layout.thumb_origin(k)
    return sheet[y : y + layout.thumb_height, x : x + layout.thumb_width]


def test_replay_answers_at_times_and_at_the_end_and_draws_the_memory(media, tmp_path):
    out = tmp_path / "out"
    proc = run([
        "replay", str(media.h264), "--actionshot", "--sample-fps", "all", "--max-frames", "5",
        "--ask", "what is happening?",
        "--ask-at", "2.5", "what colour is the square?", "--standing", "what is the man doing?",
        "--thumbnails", "8", "--progress", "--memory-bank-length", "10", "--out", str(out),
    ], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "answers.json").read_text())
    # 60 frames at 10 fps, composites of at most 5 frames (no cut is larger): 12 Shots of 0.4 s.
    shots = report["shots"]
    assert [s["start_s"] for s in shots] == pytest.approx([0.5 * i for i in range(12)])
    assert [s["end_s"] for s in shots] == pytest.approx([0.5 * i + 0.4 for i in range(12)])
    assert [s["frames"] for s in shots] == [5] * 12
    at, standing, adhoc = report["answers"]
    # Asked once the memory reached 2.5 s: right after the Shot 2.5-2.9 s, the 6th.
    assert (at["question"], at["requested_at_s"], at["asked_at_s"]) == ("what colour is the square?", 2.5, 2.9)
    assert at["span_s"] == [0.0, 2.9] and at["shots_in_memory"] == 6 and at["mode"] == "adhoc"
    assert (standing["question"], standing["mode"]) == ("what is the man doing?", "standing")
    assert (adhoc["question"], adhoc["mode"]) == ("what is happening?", "adhoc")
    for a in (standing, adhoc):
        assert a["span_s"] == [0.0, 5.9] and a["shots_in_memory"] == 12 and a["requested_at_s"] is None
    assert all(a["answer"].strip() for a in report["answers"])
    # M = 10: 12 Shots left 11 entries per token column, one of them two Shots merged. So the held
    # shares add up to 10 Shots and the merge counts of the entries holding each Shot to 10 + 2 + 2.
    assert report["memory_entries"] == 11
    assert sum(s["held"] for s in shots) == pytest.approx(10.0)
    assert sum(s["mean_merge"] for s in shots) == pytest.approx(14.0)
    assert shots[-1]["held"] == 1.0  # the newest Shot has not been merged yet
    # The sheet: 8 of 12 Shots evenly, at the layout's size, each thumbnail the right scene.
    chosen = report["contact_sheet"]["thumbnails"]
    assert chosen == [0, 2, 3, 5, 6, 8, 9, 11]
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None, "contact_sheet.png is not a readable PNG"
    layout = SheetLayout(8, THUMB_WIDTH, thumbnail_height(WIDTH, HEIGHT))
    assert layout.thumb_height == 144 and (layout.columns, layout.rows) == (6, 2)
    assert sheet.shape == (layout.height, layout.width, 3)
    assert (report["contact_sheet"]["width"], report["contact_sheet"]["height"]) == (layout.width, layout.height)
    sheet = cv2.cvtColor(sheet, cv2.COLOR_BGR2RGB)
    for k, i in enumerate(chosen):
        dark_scene = (shots[i]["start_s"] * 10 // SCENE) % 2 == 0  # synthetic scenes alternate dark / bright
        brightness = thumb(sheet, layout, k).mean()
        assert brightness < 100 if dark_scene else brightness > 150, (k, i, brightness)
        x, y = layout.thumb_origin(k)
        border = sheet[y - BORDER // 2, x + layout.thumb_width // 2]
        if shots[i]["held"] == 1.0:
            assert tuple(border) == HELD_RGB
        else:
            assert tuple(border) != HELD_RGB
    # --progress draws the bar (in place: text mode shows each "\r" as a new line) even into a pipe:
    # seconds of the 6 s video, from 0 to all of it, with the Shots and frames so far; the final line
    # says what was replayed.
    bars = [BAR.fullmatch(line) for line in proc.stderr.splitlines() if line.startswith("replay: ")]
    assert len(bars) >= 2 and all(bars), proc.stderr
    assert bars[0].group("pct", "n", "total", "shots", "frames") == ("0", "0.0", "6.0", "0", "0")
    assert bars[-1].group("pct", "n", "total", "shots", "frames") == ("100", "6.0", "6.0", "12", "60")
    for column in ("n", "shots", "frames"):
        values = [float(b[column]) for b in bars]
        assert values == sorted(values), (column, values)
    assert SUMMARY.fullmatch(proc.stderr.splitlines()[-1]), proc.stderr
    assert "60 frames, 12 Shots" in proc.stderr.splitlines()[-1]
    assert f"wrote {out / 'answers.json'}" in proc.stdout




def test_replay_range_rate_and_no_memory(media, tmp_path):
    out = tmp_path / "ranged"
    proc = run([
        "replay", str(media.h264), "--start", "1", "--end", "0:04", "--target-fps", "5", "--no-actionshot", "--sample-fps", "all",
        "--memory-bank-length", "0", "--ask-at", "2", "what is happening?", "--out", str(out),
    ], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Not a terminal and no --progress: one plain line, no bar.
    assert "%|" not in proc.stderr and "replay: " not in proc.stderr
    # (Log records, such as the warning that the built-in model has random weights, are not progress.)
    lines = [line for line in proc.stderr.strip().splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1 and SUMMARY.fullmatch(lines[0]) and "16 frames, 16 Shots" in lines[0], proc.stderr
    report = json.loads((out / "answers.json").read_text())
    shots = report["shots"]
    assert [s["start_s"] for s in shots] == pytest.approx([1.0 + 0.2 * i for i in range(16)])
    (answer,) = report["answers"]
    assert answer["asked_at_s"] == pytest.approx(2.0) and answer["span_s"] == pytest.approx([1.0, 2.0])
    # Without a bank the memory is the newest Shot alone.
    assert [s["held"] for s in shots] == [0.0] * 15 + [1.0]
    assert [s["mean_merge"] for s in shots] == [0.0] * 15 + [1.0]
    assert report["range_s"] == [1.0, 4.0] and report["memory_bank_length"] == 0


def test_replay_draws_the_bar_on_a_terminal_as_wide_as_the_terminal(media, tmp_path):
    """No --progress, but stderr is a terminal (a pty of 120 columns): the bar is drawn, each state of it
    as wide as the terminal (tqdm's bar fills the columns the text leaves, less the last column, which
    it keeps free so that the cursor never wraps)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([*CLI, "replay", str(media.h264), "--end", "2", "--out", str(tmp_path / "out")],
                                stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path)
        os.close(slave)
        data, deadline = b"", time.monotonic() + 240
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the replay has closed the terminal
                    break
                if not chunk:
                    break
                data += chunk
        assert proc.wait(timeout=30) == 0, data
        proc.stdout.close()
    finally:
        os.close(master)
    lines = [line for line in re.split(r"[\r\n]+", data.decode()) if line]
    bars = [line for line in lines if line.startswith("replay: ")]
    assert bars and all(BAR.fullmatch(b) for b in bars), lines
    assert {len(b) for b in bars} == {119}, bars
    # --end 2 keeps the frame at 2.0 s: frames 0.0 to 2.0 s at 10 fps.
    assert BAR.fullmatch(bars[-1]).group("pct", "n", "total", "frames") == ("100", "2.0", "2.0", "21")
    assert SUMMARY.fullmatch(lines[-1]) and "21 frames" in lines[-1], lines


def test_progress_bar_clamps_to_its_total_and_works_without_one(capsys):
    bar = progress_bar(6.0, draw=True)
    show_progress(bar, 2.5, 3, 25)
    show_progress(bar, 7.5, 12, 60)  # past the end of the range: counted as its end
    assert bar.n == 6.0
    bar.close()
    assert BAR.fullmatch(capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]).group(
        "pct", "n", "total", "shots", "frames") == ("100", "6.0", "6.0", "12", "60")
    with progress_bar(None, draw=True) as bar:  # a file of unknown length: seconds and rate only
        show_progress(bar, 2.46, 3, 25)
    final = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert re.fullmatch(r"replay: 2\.5 s of video \[\d\d:\d\d, +(\d+\.\d\d|\?)s/s, Shots=3, frames=25\]", final)
    with progress_bar(6.0, draw=False) as bar:
        show_progress(bar, 1.0, 1, 10)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("case", ["missing", "not_a_video", "no_video_stream", "bad_time", "late_time",
                                  "empty_question", "bad_range"])
def test_replay_user_errors_are_one_line(media, tmp_path, case):
    video = str(media.h264)
    args, expected = {
        "missing": ([str(tmp_path / "nope.mp4")], "no such file"),
        "not_a_video": ([str(media.text)], "cannot read"),
        "no_video_stream": ([str(media.audio_only)], "no video stream"),
        "bad_time": ([video, "--ask-at", "soon", "q"], "'soon' is not a time"),
        "late_time": ([video, "--ask-at", "99", "q"], "is after the end of"),
        "empty_question": ([video, "--ask", " "], "must not be empty"),
        "bad_range": ([video, "--start", "5", "--end", "2"], "must be after --start"),
    }[case]
    proc = run(["replay", *args, "--out", str(tmp_path / "out")], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixmalmm replay: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "out" / "answers.json").exists()


@pytest.mark.parametrize("option", ["--bind", "--events"])
def test_demo_refuses_a_non_loopback_address(tmp_path, option):
    proc = run(["demo", "--out", str(tmp_path / "demo"), option, "tcp://0.0.0.0:5555"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mixmalmm demo: {option} 'tcp://0.0.0.0:5555': the demo serves on loopback only (e.g. "
        "tcp://127.0.0.1:5555, or tcp://127.0.0.1:* for a free port)"]


def test_demo_end_to_end_then_keeps_serving(tmp_path):
    out = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*CLI, "demo", "--out", str(out), "--keep-serving", "--bind", "tcp://127.0.0.1:*",
             "--events", "tcp://127.0.0.1:*"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
        try:
            while "still serving" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() - started < 150, f"demo not done: {log_path.read_text()}"
                time.sleep(0.2)
            wall = time.monotonic() - started
            report = json.loads((out / "answers.json").read_text())
            shots = report["shots"]
            last = shots[-1]["start_s"]
            # A real client against the demo's engine, which still holds the whole video.
            with Client(report["endpoints"]["requests"], timeout_s=30, retries=0) as client:
                result = client.ask("demo", "which shape left?")
                assert result.answer.strip() and result.span_end_s == pytest.approx(last)
                assert client.status("demo").streams[0].shots == len(shots)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert "Traceback" not in text and text.rstrip().endswith("stopped")
    assert wall < 120, f"the demo took {wall:.0f} s"
    answers = report["answers"]
    events = [a for a in answers if a["when"] == "event"]
    during = [a for a in answers if a["when"] == "during"]
    end = [a for a in answers if a["when"] == "end"]
    assert events and all(a["mode"] == "standing" and a["question"] == report["standing"]["text"] for a in events)
    assert during and all(a["span_s"][1] < last for a in during)  # asked while the video played
    assert end and all(a["span_s"] == [shots[0]["start_s"], last] and a["answer"].strip() for a in end)
    assert [a["mode"] for a in end if a["question"] == report["standing"]["text"]] == ["standing"]
    if report["world"] == "the synthetic shapes world":  # its questions come with their answers
        assert all(a["expected"] for a in end)
        assert "(expected: " in text
    assert report["standing"]["shots_seen"] >= len(shots) - 1
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    cap = cv2.VideoCapture(report["video"])
    ok, frame = cap.read()
    cap.release()
    assert ok
    height, width = frame.shape[:2]
    layout = SheetLayout(len(shots), THUMB_WIDTH, thumbnail_height(width, height))
    assert sheet is not None and sheet.shape == (layout.height, layout.width, 3)
    assert f"wrote {out / 'answers.json'} and {out / 'contact_sheet.png'}" in text


def test_fallback_sample_video_and_its_shots(tmp_path):
    sample = scene_sample_video(tmp_path / "sample.mp4")
    log, seen = _offline_shots(sample, sample.actionshot.over(DEFAULT_INGEST))
    # 8 s at 10 fps with a cut every 2 s and composites of less than 1 s: 8 Shots of 10 frames.
    assert seen == list(range(80))
    assert [s.start for s in log.shots] == pytest.approx([float(i) for i in range(8)])
    assert [s.frames for s in log.shots] == [10] * 8
    assert sample.duration == 8.0 and sample.expected_at(sample.final[0][0], 4.0) is None


def test_demo_refuses_a_non_loopback_console(tmp_path):
    proc = run(["demo", "--out", str(tmp_path / "demo"), "--console", "0.0.0.0:8080"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mixmalmm demo: --console '0.0.0.0:8080': the demo serves on loopback only (e.g. 127.0.0.1:8080)"]


def test_demo_console_prints_its_url_and_serves_until_ctrl_c(tmp_path):
    """`demo --console`: the URL first; the page and the JSON layer on the demo's engine while it plays
    and after it, until SIGINT."""
    import urllib.request

    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*CLI, "demo", "--out", str(tmp_path / "demo"), "--console", "127.0.0.1:0", "--bind", "tcp://127.0.0.1:*",
             "--events", "tcp://127.0.0.1:*"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            started = time.monotonic()
            while "still serving" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() - started < 150, f"demo not done: {log_path.read_text()}"
                time.sleep(0.2)
            text = log_path.read_text()
            url = next(line.split("console: ", 1)[1] for line in text.splitlines() if line.startswith("console: "))
            assert url.startswith("http://127.0.0.1:") and f"the console: {url}" in text
            with urllib.request.urlopen(url, timeout=10) as r:
                assert b"mixmalmm console" in r.read()
            request = urllib.request.Request(url + "api/request", data=b'{"id": 1, "type": "status", "stream": "demo"}',
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as r:
                status = json.loads(r.read())["result"]["streams"][0]
            report = json.loads((tmp_path / "demo" / "answers.json").read_text())
            assert status["state"] == "finished" and status["shots"] == len(report["shots"])
            with urllib.request.urlopen(url + "api/streams/demo/shot.jpg", timeout=10) as r:
                assert r.headers["Content-Type"] == "image/jpeg" and r.read()[:2] == b"\xff\xd8"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert log_path.read_text().rstrip().endswith("stopped")
