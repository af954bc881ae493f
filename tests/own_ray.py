"""A Ray head node of a test's own, beside the other tests' Rays on the same machine.

`ray stop` stops every Ray on the machine, so a test stops only the processes whose command
lines name its own temp dir. Ports come from exvae_dist.common.ports, outside the kernel's
ephemeral range: one picked with bind(0) was free when picked, but another test's Ray
connections took it before `ray start` bound it (a README run in CI waited 120 s for a job
agent that never came up).
"""

import time
from pathlib import Path

from exvae_dist.common.ports import free_loopback_port


def head_ports() -> dict[str, int]:
    """Four distinct free ports: the GCS, the dashboard, the job agent and the client server."""
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(free_loopback_port())
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
    logs = [*ray_tmp.glob("session_*/logs/dashboard*.log"),  # --temp-dir=ray_tmp
            *ray_tmp.glob("ray/session_*/logs/dashboard*.log")]  # RAY_TMPDIR=ray_tmp
    for log in sorted(logs):
        if not log.parent.parent.is_symlink():  # session_latest links to one of them
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"\n--- {log.relative_to(ray_tmp)}\n" + "\n".join(text))
    return "".join(tails)
