"""A real server on free loopback ports around the stand-in handler, for the client and CLI tests."""

import pytest

from mixmalmm.streamer.server import Server

from .store_engine import StoreEngine


@pytest.fixture
def engine():
    return StoreEngine()


@pytest.fixture
def server(engine):
    server = Server(engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*").start()
    yield server
    server.stop()
