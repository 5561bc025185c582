"""A client machine installs only pyzmq and msgspec: importing mixmalmm.clients must not pull in the
engine's heavy dependencies. Checked in a fresh interpreter, since this test process already has torch."""

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
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _loaded_after_import(before: str = "") -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before, heavy=HEAVY)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_clients_loads_no_heavy_module():
    assert _loaded_after_import() == []


def test_the_probe_detects_a_heavy_module_when_one_is_imported():
    # The same probe, with numpy imported on purpose, must report it (so the check above can fail).
    assert _loaded_after_import("import numpy") == ["numpy"]
