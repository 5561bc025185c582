"""A tiny RTSP server for the streaming tests: Debian's GStreamer RTSP server serving one H.264 file.

Run with Debian's /usr/bin/python3 (GStreamer's Python bindings are not in the venv):

    /usr/bin/python3 rtsp_server.py FILE.mp4 PORT [udp]

Serves rtsp://127.0.0.1:PORT/stream; every client gets its own session that plays FILE from the
start, in real time. With "udp" it offers RTP over UDP only and refuses TCP interleaving, as many
cameras do. Prints "READY <port>" once it listens. Binds loopback only. With
RTSP_SERVER_AUTH=USER:PASSWORD in the environment, only clients that log in with that user and password
(RTSP basic authentication) may play the stream; others get 401 Unauthorized.
"""

import os
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    udp_only = sys.argv[3:] == ["udp"]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    # The file is given through the launch line, so the path must not contain quotes or spaces.
    factory.set_launch(
        f"( filesrc location={path} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    factory.set_shared(False)
    if udp_only:
        factory.set_protocols(GstRtsp.RTSPLowerTrans.UDP)
    credentials = os.environ.get("RTSP_SERVER_AUTH")
    if credentials:
        user, _, password = credentials.partition(":")
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", user)
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        for permission in ("media.factory.access", "media.factory.construct"):
            permissions.add_permission_for_role(user, permission, True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        print(f"FAILED to bind 127.0.0.1:{port}", flush=True)
        sys.exit(1)
    print(f"READY {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
