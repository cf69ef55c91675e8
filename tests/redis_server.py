"""A real ``redis-server`` for the tests: started on a free loopback port with a
temporary directory, stopped (or paused, killed, restarted) by the test."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from .service import free_port


class RedisServer:
    """One ``redis-server`` process; ``extra`` are more config arguments."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not come up")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command (inline protocol) and return the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
        self.proc.wait(20)
        self.proc = None


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above) is free too (both below
    65,536, so the port itself is at most 55,535)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20_000, 55_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """A real Redis Cluster on loopback: ``masters`` masters, each with ``replicas``
    replicas (``redis-server --cluster-enabled yes`` per node, joined by
    ``redis-cli --cluster create``). ``url`` names one node; taskd finds the others."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(masters * (1 + replicas)):
            port = _cluster_port()
            node_dir = directory / f"node{i}"
            self.nodes.append(
                RedisServer(
                    node_dir,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "1000",
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-allow-reads-when-down", "no",
                    "--repl-diskless-sync", "yes",
                    "--repl-diskless-sync-delay", "0",
                    port=port,
                )
            )  # fmt: skip
        self.replicas = replicas
        #: Replicas linked to a master that ``wait_ok`` waits for.
        self.expect_replicas = masters * replicas
        self.url = self.nodes[0].url

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs,
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok and all its slots are served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.proc is not None]
            infos = [n.command("INFO", "replication") for n in live]
            linked = sum(b"role:slave" in i and b"master_link_status:up" in i for i in infos)
            masters = sum(b"role:master" in i for i in infos)
            if all(
                b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in live
            ) and linked >= min(self.expect_replicas, len(live) - masters):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not become ok")

    def master_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for node in self.nodes:
            if node.proc is None:
                continue
            reply = node.command("CLUSTER", "NODES").decode()
            for line in reply.splitlines():
                fields = line.split()
                if len(fields) > 8 and "myself" in fields[2] and "master" in fields[2]:
                    for part in fields[8:]:
                        lo, _, hi = part.partition("-")
                        if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                            return node
        raise LookupError(key)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
