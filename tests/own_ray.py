"""A Ray head node of a test's own, beside the other tests' Rays on the same machine.

`ray stop` stops every Ray on the machine, so a test stops only the processes whose command
lines name its own temp dir. Ports are picked outside the kernel's ephemeral range (and
Ray's worker ports, 10002-19999): a port picked there with bind(0) is free at that moment,
but any outgoing connection of another test's Ray may take it before `ray start` binds it
(a README run in CI waited 120 s for a job agent that never came up).
"""

import random
import socket
import time
from pathlib import Path

PORT_RANGE = (20000, 32000)  # below 32768 (ip_local_port_range), above Ray's worker ports


def free_port() -> int:
    while True:
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def head_ports() -> dict[str, int]:
    """Four distinct free ports: the GCS, the dashboard, the job agent and the client server."""
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(free_port())
    return dict(zip(("gcs", "dashboard", "agent", "client"), sorted(ports)))


def port_exports() -> str:
    """head_ports as shell exports (RDM_GCS, ...): the README's job block picks its ports when
    it runs; exported because its health check runs in an inner `sh`."""
    return "; ".join(f"export RDM_{name.upper()}={port}" for name, port in head_ports().items())


def wait_for_agent(port: int, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/healthz", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def stop_own_ray(ray_tmp: Path) -> None:
    """Terminates the processes of the Ray clusters whose files live under `ray_tmp` only."""
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # the shell that runs the README blocks
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in spared and str(ray_tmp) in " ".join(proc.info["cmdline"] or ()):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()


def ray_log_tails(ray_tmp: Path, lines: int = 15) -> str:
    """The last lines of the dashboard's and the job agent's logs under `ray_tmp`: why a head
    node or its agent did not come up."""
    tails = []
    for log in sorted(ray_tmp.glob("session_*/logs/dashboard*.log")):
        if not log.parent.parent.is_symlink():  # session_latest links to one of them
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"\n--- {log.relative_to(ray_tmp)}\n" + "\n".join(text))
    return "".join(tails)
