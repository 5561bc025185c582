#!/usr/bin/env bash
# Sets up mixmalmm on a fresh Debian machine: a virtual environment in .venv with the pinned CPU torch
# and the project. With --test it also installs the test tools and the system packages the tests use
# (GStreamer's RTSP server, driven by Debian's /usr/bin/python3; Java for the captioning metrics;
# Chromium and its driver for the console's browser tests).
# Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$want_test" = 1 ]; then
    need_apt=0
    need_chromium=0
    need_java=0
    /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' 2>/dev/null || need_apt=1
    { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || need_chromium=1
    command -v java >/dev/null 2>&1 || need_java=1
    need_ip=0  # iproute2: the cluster tests' loopback-only network namespace
    command -v ip >/dev/null 2>&1 || need_ip=1
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    if [ "$need_apt" = 1 ] || [ "$need_chromium" = 1 ] || [ "$need_java" = 1 ] || [ "$need_ip" = 1 ]; then
        $SUDO apt-get update -qq
    fi
    if [ "$need_apt" = 1 ]; then
        echo "setup: installing GStreamer's RTSP server for the tests (apt-get)"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-base \
            gstreamer1.0-plugins-bad >/dev/null
    fi
    if [ "$need_java" = 1 ]; then
        # pycocoevalcap's PTB tokenizer and METEOR (mixmalmm eval's captioning metrics) run on Java.
        echo "setup: installing Java for the captioning metrics (apt-get)"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
    fi
    if [ "$need_ip" = 1 ]; then
        echo "setup: installing iproute2 for the cluster tests (apt-get)"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
    fi
    if [ "$need_chromium" = 1 ]; then
        echo "setup: installing Chromium and chromedriver for the console's browser tests (apt-get)"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver >/dev/null
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip 2>/dev/null || true
# The pinned CPU build first: a bare "torch" requirement would pull a multi-GB CUDA build.
$py -c 'import torch' 2>/dev/null || $py -m pip install -q torch==2.13.0
if [ "$want_test" = 1 ]; then
    $py -m pip install -q -e '.[test]'
else
    $py -m pip install -q -e .
fi
if [ "$want_test" = 1 ]; then
    # Real recordings for the tests and benchmarks that use real footage (never committed).
    bash scripts/fetch_footage.sh
fi
echo "setup: ready ($($py -c 'import torch; print("torch", torch.__version__)'))"
