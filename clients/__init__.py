"""mixmalmm.clients: the wire protocol and Python clients of the mixmalmm engine.

Imports only the standard library, pyzmq and msgspec (never torch, transformers, PyAV or OpenCV), so
a client machine needs ``pip install pyzmq msgspec`` and this package.
"""

from mixmalmm.clients.client import (
    DEFAULT_EVENT_ENDPOINT,
    DEFAULT_REQUEST_ENDPOINT,
    AsyncClient,
    Client,
    ClientClosed,
    ClientCurve,
    ClientError,
    EngineError,
    EngineTimeout,
    Gap,
    ProtocolError,
    Subscriber,
)
from mixmalmm.clients.protocol import ErrorCode, create_keypair, load_keypair

__all__ = [
    "DEFAULT_EVENT_ENDPOINT",
    "DEFAULT_REQUEST_ENDPOINT",
    "AsyncClient",
    "Client",
    "ClientClosed",
    "ClientCurve",
    "ClientError",
    "EngineError",
    "EngineTimeout",
    "ErrorCode",
    "Gap",
    "ProtocolError",
    "Subscriber",
    "create_keypair",
    "load_keypair",
]
