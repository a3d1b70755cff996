"""Fakes for tests and the local stack: a fake vLLM pool and a threaded uvicorn server."""

from foveal.testing.fakepool import FakePool, FakeScript
from foveal.testing.servers import ServerThread

__all__ = [
    "FakePool",
    "FakeScript",
    "ServerThread",
]
