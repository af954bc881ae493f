"""A free loopback port for a local Ray's dashboard (and the tests' own Ray head nodes)."""

import random
import socket

# Below the kernel's ephemeral range (32768-60999 by default), where any process's outgoing
# connections take ports (one picked there with bind(0) may be gone by the time Ray binds
# it), and above Ray's worker ports (10002-19999)
PORT_RANGE = (20000, 32000)


def free_loopback_port() -> int:
    """A random port of PORT_RANGE that is free now. Random, not Ray's usual 8265: Ray's own
    retry over ports is off when a port is given, and two local runs starting together
    would both find 8265 free."""
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")
