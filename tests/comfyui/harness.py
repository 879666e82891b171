"""A real ComfyUI for tests: a temporary base directory (models, custom_nodes, input, output, user) and a
server process on a free loopback port, driven over HTTP with API-format graphs.

Reusable by every tests/comfyui module (and by other engineers' tests): build the base folder with
:func:`build_base_dir`, start :class:`ComfyServer`, then :meth:`ComfyServer.run` a graph and read its history.
Only the standard library is used here (the test process may run under any Python).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_NODES = Path(__file__).resolve().parent / "test_nodes"
# test-only sitecustomize that lets CUDA torchvision/torchaudio wheels import next to CPU torch (see its doc)
CPU_TORCHVISION_HOOK = Path(__file__).resolve().parent / "cpu_torchvision"
PACK_NAME = "metalora"  # folder name of the pack inside custom_nodes/
START_TIMEOUT_S = 600.0  # generous: ComfyUI start-up on two busy cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_pack(base: Path) -> None:
    """custom_nodes/metalora -> this repository, custom_nodes/metalora_test_nodes -> tests/comfyui/test_nodes."""
    nodes = base / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_NAME, REPO), ("metalora_test_nodes", TEST_NODES)):
        link = nodes / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)


def gguf_nodes_path() -> Path | None:
    """city96's ComfyUI-GGUF checkout named by COMFYUI_GGUF_PATH (the loader most FLUX users run), if any."""
    path = os.environ.get("COMFYUI_GGUF_PATH")
    return Path(path) if path else None


def install_gguf_nodes(base: Path) -> bool:
    """Copy ComfyUI-GGUF into ``custom_nodes/`` (a copy: the checkout stays untouched, no __pycache__ in it)."""
    import shutil

    source = gguf_nodes_path()
    if source is None:
        return False
    if not (source / "nodes.py").is_file():
        raise FileNotFoundError(f"COMFYUI_GGUF_PATH={source} is not a ComfyUI-GGUF checkout (no nodes.py)")
    target = base / "custom_nodes" / "ComfyUI-GGUF"
    if not target.exists():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    return True


def build_base_dir(base: Path) -> Path:
    """An empty ComfyUI base folder with the pack linked in; callers add model files under ``models/``."""
    for sub in (
        "models/diffusion_models",
        "models/loras",
        "models/metalora",
        "input",
        "output",
        "user",
        "temp",
    ):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_pack(base)
    install_gguf_nodes(base)
    return base


@dataclass
class RunResult:
    """One executed prompt: its id, ``status`` ("success" / "error"), outputs (ui data by node id), messages."""

    prompt_id: str
    status: str
    outputs: dict
    messages: list

    @property
    def error(self) -> dict | None:
        """The ``execution_error`` payload (node_id, node_type, exception_type, exception_message) or None."""
        for kind, data in self.messages:
            if kind == "execution_error":
                return data
        return None

    @property
    def interrupted(self) -> bool:
        return any(kind == "execution_interrupted" for kind, _ in self.messages)


class ComfyError(RuntimeError):
    """A prompt the server refused (validation) or a server that would not start."""

    def __init__(self, message: str, payload: object = None) -> None:
        super().__init__(message)
        self.payload = payload


class ComfyServer:
    """``main.py --cpu`` on 127.0.0.1 with ``--base-directory``; :meth:`start` waits until it answers."""

    def __init__(
        self,
        comfy_path: str | os.PathLike,
        base: str | os.PathLike,
        python: str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.comfy_path = Path(comfy_path)
        self.base = Path(base)
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.port = port or free_port()
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.client_id = uuid.uuid4().hex  # the front end routes "executed" messages to this client
        self.proc: subprocess.Popen | None = None

    # --- process ---------------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> ComfyServer:
        cmd = [
            self.python,
            str(self.comfy_path / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(CPU_TORCHVISION_HOOK), env.get("PYTHONPATH", "")) if p
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfy_path,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server (and only it) and wait; kill it if it does not stop in 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
        self._log.close()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # --- HTTP ------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: object = None, timeout: float = 60) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 60) -> object:
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body: object = None, timeout: float = 60) -> object:
        return self._request("POST", path, body if body is not None else {}, timeout)

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""), timeout=120)  # type: ignore[return-value]

    def queue(self, graph: dict) -> str:
        """POST /prompt; a graph the server refuses (validation errors) raises :class:`ComfyError`."""
        try:
            answer = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            raise ComfyError(f"prompt refused: {json.dumps(payload)[:2000]}", payload) from None
        return answer["prompt_id"]  # type: ignore[index]

    def wait(self, prompt_id: str, timeout: float = 600) -> RunResult:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") in ("success", "error"):
                    return RunResult(
                        prompt_id, status["status_str"], entry.get("outputs", {}), status.get("messages", [])
                    )
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600) -> RunResult:
        return self.wait(self.queue(graph), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt")

    def free_memory(self) -> None:
        """Unload models and clear ComfyUI's node cache (between tests that must not share results)."""
        self.post("/free", {"unload_models": True, "free_memory": True})


def node(class_type: str, **inputs) -> dict:
    """One API-format node; link inputs as ``["<node id>", <output index>]``."""
    return {"class_type": class_type, "inputs": inputs}
