"""The native llama-server: its cached build (scripts/build_llama_server.py), the runtime choice for the embedded
teacher (teacher.runtime), what it puts in a request key, and the real binary answering distill's own requests."""

from __future__ import annotations

import io
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from distill import DistillError
from distill.config import TeacherConfig
from distill.teacher import server as srv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import build_llama_server as build  # noqa: E402


def _executable(path: Path, exit_code: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """An empty binary folder for this test: the real cache (if built) is out of the picture."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv(srv.BINARY_DIR_ENV, str(folder))
    monkeypatch.delenv(srv.BINARY_ENV, raising=False)
    return folder


# --- the build script ---------------------------------------------------------------------------------------------

def test_a_runnable_cached_binary_is_kept_and_nothing_is_built(tmp_path, monkeypatch, capsys):
    cached = _executable(build.binary_path(tmp_path, "9.9.9"))
    monkeypatch.setattr(build, "check_model", lambda: None)  # a shell script serves no model: --version only
    before = cached.stat().st_mtime_ns
    monkeypatch.setattr(build, "check_toolchain", lambda: pytest.fail("the toolchain was consulted: a rebuild"))
    monkeypatch.setattr(build, "download_sdist", lambda *a: pytest.fail("the sdist was downloaded: a rebuild"))
    assert build.main(["--version", "9.9.9", "--dest", str(tmp_path)]) == 0
    assert cached.stat().st_mtime_ns == before
    assert "already built" in capsys.readouterr().out


def test_a_cached_binary_that_does_not_run_is_rebuilt_and_a_missing_toolchain_says_what_to_install(
        tmp_path, monkeypatch, capsys):
    _executable(build.binary_path(tmp_path, "9.9.9"), exit_code=1)  # e.g. built for another CPU
    monkeypatch.setattr(build, "check_model", lambda: None)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build, "download_sdist", lambda *a: pytest.fail("downloaded before checking the toolchain"))
    assert build.main(["--version", "9.9.9", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cmake and a C++ compiler (g++ or clang++) not found" in err and "apt-get install cmake g++" in err


def _crashes_on_a_model(path: Path) -> Path:
    """A binary whose --version works and which dies of SIGSEGV once asked to load a model (as ggml's AMX matmul
    did on an AMX CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\n[ "$1" = --version ] && exit 0\nkill -SEGV $$\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _serves_a_model(path: Path) -> Path:
    """A binary that answers the two calls of llama-server's OpenAI API that the check makes, on its --port."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!{sys.executable}
import http.server, json, sys
if sys.argv[1:] == ["--version"]:
    sys.exit(0)
class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):  # /v1/models: the start-up poll
        self.reply({{"data": []}})
    def do_POST(self):  # /v1/completions
        self.rfile.read(int(self.headers["Content-Length"]))
        self.reply({{"choices": [{{"text": " there"}}]}})
port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_binary_counts_as_built_only_when_it_serves_the_model(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf")
    crashing = _crashes_on_a_model(tmp_path / "crashes")
    assert build.runnable(crashing) and not build.runnable(crashing, model)  # --version alone passed it before
    assert build.runnable(_serves_a_model(tmp_path / "serves"), model)


def test_a_cached_binary_that_crashes_on_the_model_is_rebuilt_native_then_portable(tmp_path, monkeypatch, capsys):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf")
    target = _crashes_on_a_model(build.binary_path(tmp_path, "9.9.9"))
    flavours = []

    def fake_build(version, dest, *, jobs, native, sdist, model):
        flavours.append(native)
        if native:
            raise build.DoesNotServe("built but does not serve; removed")
        return _serves_a_model(target)

    monkeypatch.setattr(build, "_build", fake_build)
    monkeypatch.setattr(build, "check_model", lambda: model)
    assert build.main(["--version", "9.9.9", "--dest", str(tmp_path)]) == 0
    assert flavours == [True, False] and build.runnable(target, model)
    err = capsys.readouterr().err
    assert "does not serve m.gguf: rebuilding" in err and "building a portable one (GGML_NATIVE=OFF)" in err


def test_a_build_that_does_not_serve_is_removed_not_left_for_the_teacher_to_take(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf")
    real_run = build.subprocess.run

    def cmake(cmd, **kwargs):  # configure: nothing; build: a binary that crashes on the model
        if cmd[0] != "cmake":
            return real_run(cmd, **kwargs)
        if "--build" in cmd:
            _crashes_on_a_model(Path(cmd[2]) / "bin" / "llama-server")

    monkeypatch.setattr(build, "check_toolchain", lambda: ("cmake", "c++"))
    monkeypatch.setattr(build, "extract_vendored", lambda sdist, into: into)
    monkeypatch.setattr(build.subprocess, "run", cmake)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    sdist.write_bytes(b"")
    with pytest.raises(build.BuildError, match=r"GGML_NATIVE=OFF\) but does not serve m.gguf; removed"):
        build.build("9.9.9", tmp_path / "bin", sdist=sdist, model=model)
    assert not build.binary_path(tmp_path / "bin", "9.9.9").exists()


def test_native_builds_leave_amx_out_on_x86(monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    native = build.cmake_args(Path("s"), Path("b"), native=True)
    assert "-DGGML_NATIVE=ON" in native and f"-DCMAKE_CXX_FLAGS={build.NO_AMX}" in native
    assert not any("amx" in a for a in build.cmake_args(Path("s"), Path("b"), native=False))
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    assert not any("amx" in a for a in build.cmake_args(Path("s"), Path("b"), native=True))


def test_force_rebuilds_a_runnable_binary(tmp_path, monkeypatch):
    _executable(build.binary_path(tmp_path, "9.9.9"))
    calls = []
    monkeypatch.setattr(build, "check_toolchain", lambda: calls.append("toolchain") or ("cmake", "c++"))
    monkeypatch.setattr(build, "extract_vendored", lambda *a: (_ for _ in ()).throw(build.BuildError("stop")))
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    sdist.write_bytes(b"")
    with pytest.raises(build.BuildError, match="stop"):
        build.build("9.9.9", tmp_path, sdist=sdist, force=True)
    assert calls == ["toolchain"]


def test_a_named_sdist_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "check_toolchain", lambda: ("cmake", "c++"))
    with pytest.raises(build.BuildError, match="does not exist; omit it"):
        build.build("9.9.9", tmp_path, sdist=tmp_path / "nope.tar.gz")


def _sdist(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_only_the_vendored_llama_cpp_tree_is_extracted(tmp_path):
    sdist = _sdist(tmp_path / "s.tar.gz", ["llama_cpp_python-9/vendor/llama.cpp/tools/server/CMakeLists.txt",
                                           "llama_cpp_python-9/vendor/llama.cpp/CMakeLists.txt",
                                           "llama_cpp_python-9/llama_cpp/llama.py"])
    root = build.extract_vendored(sdist, tmp_path / "out")
    assert (root / "tools" / "server" / "CMakeLists.txt").is_file() and (root / "CMakeLists.txt").is_file()
    assert not any(p.name == "llama.py" for p in (tmp_path / "out").rglob("*"))
    without_server = _sdist(tmp_path / "t.tar.gz", ["llama_cpp_python-9/vendor/llama.cpp/CMakeLists.txt"])
    with pytest.raises(build.BuildError, match="no vendored llama.cpp server sources"):
        build.extract_vendored(without_server, tmp_path / "out2")


def test_the_build_asks_for_the_server_target_only_without_https_or_ui_downloads(tmp_path):
    args = build.cmake_args(tmp_path / "src", tmp_path / "b", native=False)
    assert {"-DGGML_NATIVE=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
            "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"} <= set(args)
    assert "-DGGML_NATIVE=ON" in build.cmake_args(tmp_path / "src", tmp_path / "b", native=True)


# --- the runtime choice -------------------------------------------------------------------------------------------

def test_auto_takes_the_native_server_only_when_it_is_built(bin_dir):
    assert srv.llama_server_binary() is None
    assert srv.resolve_runtime("auto") == "llama_cpp_python"
    with pytest.raises(DistillError, match="not built; build it with `python scripts/build_llama_server.py"):
        srv.resolve_runtime("llama_server")
    binary = _executable(bin_dir / f"llama-server-{srv.llama_cpp_version()}")
    assert srv.llama_server_binary() == binary
    assert srv.resolve_runtime("auto") == "llama_server"
    assert srv.resolve_runtime("llama_server") == "llama_server"
    assert srv.resolve_runtime("llama_cpp_python") == "llama_cpp_python"
    with pytest.raises(DistillError, match="unknown teacher.runtime 'fast'"):
        srv.resolve_runtime("fast")


def test_a_binary_named_in_the_environment_must_exist(bin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(srv.BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(DistillError, match="DISTILL_LLAMA_SERVER=.* is not an executable file"):
        srv.resolve_runtime("auto")
    monkeypatch.setenv(srv.BINARY_ENV, str(_executable(tmp_path / "mine")))
    assert srv.resolve_runtime("auto") == "llama_server"


def test_the_native_runtime_is_part_of_the_key_and_the_python_servers_keys_are_unchanged(bin_dir, tmp_path):
    from distill.ledger import request_key
    from distill.teacher.request import build_score_request, teacher_identity

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"model")
    messages = [{"role": "user", "content": "hi"}]

    def tcfg(runtime):
        return TeacherConfig(kind="llama_cpp", model="t", structured_output="llama_cpp", model_path=str(gguf),
                             runtime=runtime)

    python_identity = teacher_identity(tcfg("auto"))  # nothing built: the Python server
    assert set(python_identity) == {"gguf_sha256", "n_ctx"}
    python_key = request_key(build_score_request(tcfg("auto"), messages))
    _executable(bin_dir / f"llama-server-{srv.llama_cpp_version()}")
    assert teacher_identity(tcfg("auto")) == {**python_identity, "runtime": "llama_server"}
    assert request_key(build_score_request(tcfg("auto"), messages)) != python_key
    assert request_key(build_score_request(tcfg("llama_cpp_python"), messages)) == python_key


def test_the_native_server_listens_on_loopback_with_a_context_of_n_ctx_per_slot(bin_dir, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"model")
    with pytest.raises(DistillError, match="native llama-server is not built"):
        srv.LlamaServer(gguf)
    binary = _executable(bin_dir / f"llama-server-{srv.llama_cpp_version()}")
    cmd = srv.LlamaServer(gguf, slots=4, n_ctx=1024, n_threads=2).command()
    assert cmd[0] == str(binary)
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    assert opts["--host"] == "127.0.0.1" and opts["--parallel"] == "4" and opts["--ctx-size"] == "4096"
    assert "--no-webui" in cmd
    with pytest.raises(DistillError, match="at least one slot"):
        srv.LlamaServer(gguf, slots=0)


def test_the_teacher_endpoint_starts_the_runtime_chosen(bin_dir, monkeypatch, tmp_path):
    from distill.config import load_config

    started = []

    class Recorder(srv.LoopbackServer):
        def __init__(self, *a, **kw):
            super().__init__()
            started.append((type(self).__name__, kw))

        def start(self):
            return self

    monkeypatch.setattr(srv, "LlamaServer", type("LlamaServer", (Recorder,), {}))
    monkeypatch.setattr(srv, "LlamaCppServer", type("LlamaCppServer", (Recorder,), {}))
    cfg = load_config(["recipe=support_tickets", "teacher=local", "teacher.concurrency=3"])
    with srv.teacher_endpoint(cfg, tmp_path, logits_all=True):
        pass
    _executable(bin_dir / f"llama-server-{srv.llama_cpp_version()}")
    with srv.teacher_endpoint(cfg, tmp_path, logits_all=True):
        pass
    cfg.teacher.runtime = "llama_cpp_python"
    with srv.teacher_endpoint(cfg, tmp_path):
        pass
    assert [name for name, _ in started] == ["LlamaCppServer", "LlamaServer", "LlamaCppServer"]
    assert started[0][1]["logits_all"] is True and started[1][1]["slots"] == 3 and "logits_all" not in started[1][1]


@pytest.mark.parametrize("user_value,seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_llama_servers_start_with_sleeping_openmp_waits_unless_the_user_chose(tmp_path, monkeypatch, user_value, seen):
    out = tmp_path / "env.txt"

    class EnvDump(srv.LoopbackServer):  # a child that records its environment and exits
        env_defaults = srv.LlamaServer.env_defaults

        def command(self):
            return [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ['OMP_WAIT_POLICY'])"]

    if user_value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user_value)
    with pytest.raises(DistillError, match="exited with code 0 while starting"):
        EnvDump(log_path=tmp_path / "log").start()
    assert out.read_text() == seen
    assert srv.LlamaCppServer.env_defaults == srv.LlamaServer.env_defaults


def test_a_native_server_that_dies_of_a_signal_while_starting_says_how_to_rebuild(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf")
    server = srv.LlamaServer(model, binary=_crashes_on_a_model(tmp_path / "llama-server"), log_path=tmp_path / "log")
    with pytest.raises(DistillError, match=r"exited with code -11 while starting .*scripts/build_llama_server.py "
                                           r"--version .* --force.*teacher.runtime=llama_cpp_python"):
        server.start()
    assert server.proc is None  # stopped, nothing left running


# --- the real binary, when built ----------------------------------------------------------------------------------

def _built_binary() -> Path | None:
    try:
        return srv.llama_server_binary()
    except DistillError:
        return None


@pytest.mark.skipif(_built_binary() is None,
                    reason="the native llama-server is not built (python scripts/build_llama_server.py --version "
                           "<llama-cpp-python version>, or make setup)")
def test_the_native_server_answers_generates_score_and_label_requests_unchanged(tmp_path):
    """The bodies distill sends to llama-cpp-python's server (top_logprobs; the llama_cpp json_object + schema
    response format) need no translation: the native server reads them and distill's readers parse its answers."""
    import json
    import urllib.request

    from distill.task import OutputSchema
    from distill.teacher.answers import ChatReader, ScoreReader, usage_tokens
    from distill.teacher.request import build_chat_request, build_score_request, wire_body

    schema = OutputSchema({"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
                           "required": ["colour"], "additionalProperties": False})
    tcfg = TeacherConfig(kind="llama_cpp", model="teacher", structured_output="llama_cpp", max_tokens=16,
                         runtime="llama_server")
    messages = [{"role": "system", "content": "Answer with the colour of the sky as JSON."},
                {"role": "user", "content": "What colour is the sky?"}]

    def post(base_url, request):
        body = json.dumps(wire_body(request)).encode()
        req = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    log_path = tmp_path / "server.log"
    with srv.LlamaServer(srv.embedded_gguf(), alias="teacher", n_ctx=1024, slots=2, log_path=log_path) as server:
        scored = post(server.base_url, build_score_request(tcfg, messages))
        text, answer, reason = ScoreReader().body(scored)
        assert reason is None and len(answer["top"]) == 20
        assert all(lp <= 0 for _, lp in answer["top"]) and answer["top"] == sorted(answer["top"], key=lambda t: -t[1])
        labelled = post(server.base_url, build_chat_request(tcfg, schema, messages, 0, None))
        text, answer, reason = ChatReader(schema.parse).body(labelled)
        assert reason is None and answer["colour"] in ("red", "blue")  # the grammar held the answer to the schema
        # the same score request again: the slot's cache served the prompt, and the usage says so
        again = post(server.base_url, build_score_request(tcfg, messages))
        prompt, cached, completion = usage_tokens(again["usage"])
        assert completion == 1 and 0 < cached <= prompt
        assert ScoreReader().body(again)[1]["top"][0][0] == answer_top(scored)
    assert server.proc is None and log_path.stat().st_size > 0


def answer_top(body: dict) -> str:
    return body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"]


@pytest.mark.skipif(_built_binary() is None,
                    reason="the native llama-server is not built (python scripts/build_llama_server.py --version "
                           "<llama-cpp-python version>, or make setup)")
def test_the_native_server_scores_as_llama_cpp_python_does(tmp_path):
    """The two runtimes give the same top log-probs for generate's score request after a cached few-shot prefix.

    llama-server's default (flash attention on for the CPU) kept the attention sums in f16 and moved these by up to
    0.3 nats on the embedded teacher; with it off, as llama-cpp-python runs, they agree to rounding."""
    import json
    import urllib.request

    from distill.teacher.answers import ScoreReader
    from distill.teacher.request import build_score_request, wire_body

    tcfg = TeacherConfig(kind="llama_cpp", model="teacher", structured_output="llama_cpp", runtime="llama_server")
    shots = " ".join(f"Ticket {i}: my order number {1000 + 37 * i} has not arrived, category shipping."
                     for i in range(20))
    prefix = [{"role": "system", "content": f"Label the ticket's category. Examples: {shots}"}]

    def request(question):
        return wire_body(build_score_request(tcfg, [*prefix, {"role": "user", "content": question}]))

    def post(base_url, body):
        req = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return dict(ScoreReader().body(json.loads(resp.read()))[1]["top"])

    tops = []
    for server in (srv.LlamaServer(srv.embedded_gguf(), alias="teacher", n_ctx=2048, log_path=tmp_path / "a.log"),
                   srv.LlamaCppServer(srv.embedded_gguf(), alias="teacher", n_ctx=2048, logits_all=True,
                                      log_path=tmp_path / "b.log")):
        with server:
            post(server.base_url, request("Ticket: I was charged twice for one month."))  # caches the prefix
            tops.append(post(server.base_url, request("Ticket: the parcel came broken, who pays the return?")))
    native, python = tops
    shared = [t for t in native if t in python]
    assert len(shared) >= 15
    assert max(abs(native[t] - python[t]) for t in shared) < 0.01
