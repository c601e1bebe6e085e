"""A free TCP port on this machine: where benchmarks and tests start a server of their own (the app, Milvus)."""
import socket


def free_port() -> int:
    """A port no one listens on now (the system's choice; another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
