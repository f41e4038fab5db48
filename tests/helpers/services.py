"""What tests need of the network: free loopback ports, and the fake credentials of the S3 API server."""

from __future__ import annotations

import secrets
import socket

# Credentials that look like real ones and appear nowhere else, so a test can search for leaks of them.
ACCESS_KEY_ID = "AKIADREAMFLEETTEST42"
SECRET_ACCESS_KEY = "dfSecret/" + secrets.token_hex(16)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
