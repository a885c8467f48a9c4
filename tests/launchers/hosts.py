"""Two "hosts" on one machine: network namespaces joined by a bridge.

    host (root namespace)   bridge <br> 10.R.0.254/24
      ├── veth ── namespace <ns0>  10.R.0.1  (hostname n0 where a process asks for it)
      └── veth ── namespace <ns1>  10.R.0.2

Every name carries this process's id, so parallel sessions do not collide;
`close()` deletes the namespaces and the bridge (killing what still runs in
them) even when a test failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_available() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("nsenter") or not shutil.which("unshare"):
        return "needs iproute2 (ip) and util-linux (nsenter, unshare): scripts/ci_system_deps.sh installs them"
    return None


@dataclass
class Host:
    name: str      # hostname inside (n0, n1)
    netns: str     # namespace name
    addr: str      # its address on the bridge
    ifname: str    # its interface (for GLOO_SOCKET_IFNAME)

    def prefix(self, uts: bool = True) -> list[str]:
        """Run a command on this host: its network namespace and (uts) its own hostname.
        nsenter rather than `ip netns exec`, which remounts /sys (slurmd then fails)."""
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if uts:
            cmd += ["unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh"]
        return cmd


class TwoHosts:
    def __init__(self, n: int = 2):
        tag = os.getpid() % 100000
        octet = 100 + os.getpid() % 150
        self.subnet = f"10.{octet}.0.0/24"
        self.bridge = f"dibr{tag}"
        self.gateway = f"10.{octet}.0.254"
        self.hosts = [Host(f"n{i}", f"di{tag}n{i}", f"10.{octet}.0.{i + 1}", f"eth{i}") for i in range(n)]
        try:
            self._create()
        except Exception:
            self.close()
            raise

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, h in enumerate(self.hosts):
            outside = f"{self.bridge}v{i}"
            _ip("netns", "add", h.netns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", h.ifname, "netns", h.netns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", h.netns, "route", "add", "default", "via", self.gateway)

    def netns_map(self) -> str:
        """For launch/netns_rsh.sh: 'addr=netns=hostname ...'."""
        return " ".join(f"{h.addr}={h.netns}={h.name}" for h in self.hosts)

    def close(self) -> None:
        for h in self.hosts:
            pids = _ip("netns", "pids", h.netns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if pids:
                time.sleep(0.5)
            _ip("netns", "delete", h.netns, check=False)
        _ip("link", "delete", self.bridge, check=False)
