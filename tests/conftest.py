"""Test session set-up shared by every test module.

Isolation: when run as root (our machines and CI), the whole test session
moves into a private network namespace before anything else starts, so its
servers on 127.0.0.x:25 cannot clash with the host's and nothing the code
under test does can reach any address but this private loopback.  Set
``MXQ_TEST_NETNS=0`` to run in the host's namespace instead.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

CLONE_NEWNET = 0x40000000


def _enter_private_netns() -> bool:
    if os.environ.get("MXQ_TEST_NETNS", "1") == "0" or os.geteuid() != 0:
        return False
    if os.environ.get("MXQ_IN_TEST_NETNS") == "1":   # already moved (re-imported)
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["MXQ_IN_TEST_NETNS"] = "1"
    return True


IN_PRIVATE_NETNS = _enter_private_netns()

# The code under test must never fall back to the system resolver: point it
# at a server that does not exist until a test starts its own.
os.environ.setdefault("MXQ_DNS_SERVERS", "127.0.0.1:9")
os.environ.setdefault("MXQ_HELO_NAME", "client.mxq.test")
