"""Credentials out of shown URIs and messages (streamer/redact.py)."""

from __future__ import annotations

import pytest

from mixmalmm.streamer.redact import redact_text, redact_uri, secrets_of


@pytest.mark.parametrize(("uri", "shown"), [
    ("rtsp://admin:hunter2@10.0.0.5:554/live?channel=1", "rtsp://admin:***@10.0.0.5:554/live?channel=1"),
    ("rtsp://admin:p@ss@10.0.0.5/live", "rtsp://admin:***@10.0.0.5/live"),  # the host follows the last "@"
    ("rtsp://admin:p%40ss@cam/x", "rtsp://admin:***@cam/x"),
    ("rtsp://admin@cam/x", "rtsp://admin@cam/x"),  # a user without a password: nothing secret
    ("rtsp://admin:@cam/x", "rtsp://admin:@cam/x"),
    ("https://cdn/live.m3u8?token=abc&quality=hd#t=3", "https://cdn/live.m3u8?token=***&quality=hd#t=3"),
    ("https://s3/v.mp4?X-Amz-Credential=c1&X-Amz-Signature=s1&X-Amz-Expires=60",
     "https://s3/v.mp4?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("http://cam/mjpg?user=bob&pwd=x1&apikey=k&api_key=k2&auth=a&sig=s&passwd=p&Password=q&secret=z",
     "http://cam/mjpg?user=bob&pwd=***&apikey=***&api_key=***&auth=***&sig=***&passwd=***&Password=***&secret=***"),
    ("http://cam/x?token=&key", "http://cam/x?token=&key"),  # empty values stay as they are
    ("/videos/film.mp4", "/videos/film.mp4"),
    ("file:///videos/a:b@c.mp4", "file:///videos/a:b@c.mp4"),  # no authority: a path, shown as it is
    ("synthetic:?width=320&fps=10", "synthetic:?width=320&fps=10"),
    ("webcam:0", "webcam:0"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # idempotent


def test_secrets_of_gives_both_forms_of_each_value():
    assert secrets_of("rtsp://u:p%40ss@h/x?token=t%2B1&q=1") == ["p%40ss", "t%2B1", "p@ss", "t+1"]
    assert secrets_of("/a/b.mp4") == [] and secrets_of("rtsp://u@h/x") == []


def test_redact_text_masks_every_uri_and_the_sources_secrets():
    uri = "rtsp://cam:hunter22@127.0.0.1:8554/stream"
    # FFmpeg's message as PyAV raises it: the URL it was given, quoted.
    text = f"[Errno 825242872] Server returned 401 Unauthorized (authorization failed): '{uri}'"
    assert redact_text(text, uri) == ("[Errno 825242872] Server returned 401 Unauthorized (authorization failed): "
                                      "'rtsp://cam:***@127.0.0.1:8554/stream'")
    # Another URL with other credentials (a redirect), and the password outside any URL.
    text = "redirected to http://x:y-secret@other/s; login hunter22 refused"
    assert redact_text(text, uri) == "redirected to http://x:***@other/s; login *** refused"
    # A short secret is masked inside URLs only: masking each "ab" of a message would garble it.
    assert redact_text("about rtsp://u:ab@h/x", "rtsp://u:ab@h/x") == "about rtsp://u:***@h/x"
