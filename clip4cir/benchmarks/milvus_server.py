"""A real Milvus standalone server for the tests and the store benchmark: PyPI ``milvus`` ships ``milvus-server``;
it is started on free ports with its data in a folder of ours, waited for, and stopped by its process id (its
whole process group: it runs etcd and Milvus beside the launcher)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from clip4cir.core.ports import free_port

PORTS = ("etcd-port", "proxy-port", "proxy-internal-port", "root-coord-port", "query-coord-port", "query-node-port",
         "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")
ROOT_TOKEN = "root:Milvus"  # the default account of a server with authorization enabled



class MilvusServer:
    """``milvus-server`` in ``folder`` (its data and log), with authorization when ``auth``."""

    def __init__(self, folder: Path, auth: bool = False):
        if shutil.which("milvus-server") is None:
            raise RuntimeError("milvus-server is not installed: pip install milvus")
        self.folder, self.auth = Path(folder), auth
        self.ports = {name: free_port() for name in PORTS}
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy-port']}"

    @property
    def token(self) -> str:
        return ROOT_TOKEN if self.auth else ""

    def start(self, wait: float = 240.0) -> MilvusServer:
        """Start it and wait until it answers (about 10 to 40 s); the same ports and data on a restart."""
        self.folder.mkdir(parents=True, exist_ok=True)
        args = ["milvus-server", "--data", str(self.folder / "data")]
        for name, port in self.ports.items():
            args += [f"--{name}", str(port)]
        if self.auth:
            args += ["--authorization-enabled", "true"]
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=self.folder)
        log.close()
        from pymilvus import MilvusClient
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {self.process.returncode}; see "
                                   f"{self.folder / 'server.log'}")
            try:
                MilvusClient(uri=self.uri, token=self.token, timeout=3).list_collections()
                return self
            except Exception:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"milvus-server did not answer within {wait:.0f} s; see {self.folder / 'server.log'}")

    def _group(self) -> list[int]:
        """The process ids of the server's group: the launcher, Milvus and what it runs."""
        group, found = os.getpgid(self.process.pid), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) == group:
                    found.append(int(pid))
            except ProcessLookupError:
                continue
        return found

    def stop(self) -> None:
        """Stop the server's whole process group at once (SIGKILL, as a crash or a lost machine would). A
        graceful SIGTERM takes over a minute here, and a restart on the same data then waits for the stale
        sessions it left in etcd; after a kill it answers again in about 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(20)

    def memory_mib(self) -> float:
        """Resident memory of the server's processes (the launcher, Milvus and etcd), in MiB."""
        total = 0
        for pid in self._group():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
