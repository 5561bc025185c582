"""A client machine installs only pyzmq and msgspec: importing mixmalmm.clients (the command line too) must
not pull in the engine's heavy dependencies. Checked in a fresh interpreter, since this test process already
has torch."""

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "av", "cv2", "numpy", "triton", "mixmalmm.model", "mixmalmm.kernels",
         "mixmalmm.streamer"]

PROBE = """
import json, sys
{before}
import mixmalmm.clients
import mixmalmm.clients.client
import mixmalmm.clients.protocol
import mixmalmm.clients.cli
{after}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _loaded_after_import(before: str = "", after: str = "") -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before, after=after, heavy=HEAVY)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_clients_loads_no_heavy_module():
    assert _loaded_after_import() == []


def test_the_probe_detects_a_heavy_module_when_one_is_imported():
    # The same probe, with numpy imported on purpose, must report it (so the check above can fail).
    assert _loaded_after_import("import numpy") == ["numpy"]


def test_running_client_commands_loads_no_heavy_module(tmp_path):
    # The command line's client paths run in the probe: parsing, a request that times out, key creation.
    after = (
        "from mixmalmm.clients.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['ping', '--server', 'tcp://127.0.0.1:9', '--timeout', '0.05', '--retries', '0']) == 3\n"
        f"assert main(['keys', {str(tmp_path)!r}, 'probe', '--json']) == 0\n"
        "assert main(['watch', '--events', 'tcp://127.0.0.1:9', '--timeout', '0.05']) == 0\n"
    )
    assert _loaded_after_import(after=after) == []
