"""A real MLflow tracking server for tests, on loopback, that can be killed and restarted.

    with MlflowServer(tmp_path) as server:          # starts it, waits for GET /health
        ... tracking_uri=server.uri ...
        server.stop()                                 # SIGKILL, the whole process tree
        server.start()                                # same port, same store

The store is SQLite (``<root>/mlflow.db``) and artifacts are served over HTTP from
``<root>/artifacts`` (``--artifacts-destination``). Startup takes 10-20 s on a small
machine, so start one per test module where possible.

``DroppingProxy`` forwards a TCP port to the server and can swallow the responses to
chosen requests after the server has handled them: the "timed out, but it did land"
case a client must not turn into duplicates. It also keeps every request it forwarded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.multiprocess import free_port

STARTUP_TIMEOUT_S = 120.0


def mlflow_executable() -> str:
    """The ``mlflow`` CLI of the interpreter running the tests (the project's venv)."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


def unused_uri() -> str:
    """An http URI on a loopback port nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


class MlflowServer:
    """``mlflow server`` in its own process group, with a log file in ``root``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        if self._process is not None:
            raise RuntimeError("the server is already running")
        command = [
            mlflow_executable(),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        # The server's background job runner (a huey consumer) is not needed for tracking
        # and costs CPU and startup time.
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        environment.pop("MLFLOW_TRACKING_URI", None)
        with self.log_path.open("a") as log:
            # A new session: stop() kills the server and its uvicorn workers together.
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self.root,
                start_new_session=True,
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill the server (no clean shutdown: this is also the crash test) and wait."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self._process.returncode}:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(
            f"mlflow server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class DroppingProxy:
    """A loopback TCP proxy to ``upstream_port`` that understands just enough HTTP/1.1 to
    see each request, and can drop the responses to some of them.

    ``drop_responses(marker, count)``: the next ``count`` requests whose request line
    contains ``marker`` are forwarded and handled by the server, but the client gets its
    connection closed instead of the response. ``requests`` holds (request line, body) of
    everything forwarded, in order.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, bytes]] = []
        self.dropped = 0
        self._drop_marker = ""
        self._drops_left = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_responses(self, marker: str, count: int) -> None:
        with self._lock:
            self._drop_marker, self._drops_left = marker, count

    def bodies(self, marker: str) -> list[dict]:
        """The JSON bodies of the forwarded requests whose request line contains ``marker``."""
        with self._lock:
            return [json.loads(body) for line, body in self.requests if marker in line and body]

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        except OSError:
            client.close()
            return
        # The server's answers flow back on their own thread, unless a drop is armed.
        drop_next = threading.Event()
        threading.Thread(
            target=self._pipe_responses, args=(upstream, client, drop_next), daemon=True
        ).start()
        buffer = b""
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while True:
                    request, buffer = _split_request(buffer)
                    if request is None:
                        break
                    line, body, raw = request
                    with self._lock:
                        self.requests.append((line, body))
                        if self._drops_left and self._drop_marker in line:
                            self._drops_left -= 1
                            self.dropped += 1
                            drop_next.set()
                    upstream.sendall(raw)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.close()
                except OSError:
                    pass

    @staticmethod
    def _pipe_responses(
        upstream: socket.socket, client: socket.socket, drop_next: threading.Event
    ) -> None:
        try:
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                if drop_next.is_set():
                    # The server has handled the request; the client never hears of it.
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    upstream.close()
                    return
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                client.close()
            except OSError:
                pass


def _split_request(buffer: bytes) -> tuple[tuple[str, bytes, bytes] | None, bytes]:
    """One complete HTTP request (line, body, raw bytes) off the front of ``buffer``."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None, buffer
    head = buffer[:head_end].decode("latin-1")
    length = 0
    for header in head.split("\r\n")[1:]:
        name, _, value = header.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    end = head_end + 4 + length
    if len(buffer) < end:
        return None, buffer
    return (head.split("\r\n")[0], buffer[head_end + 4 : end], buffer[:end]), buffer[end:]
