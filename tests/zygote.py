"""Programs the tests start (`python train.py ...`), forked from a server that has imported torch already.

A fresh `python train.py` spends ~2.7 of its ~3.3 CPU-s on a short test run importing torch and torch._dynamo
(torch's optimisers load it); the slow tests start ~40 such programs. Each xdist worker starts this file once as
a server, which imports those libraries and then forks one child per program: the child takes the program's
standard streams, working folder, environment and argv, and runs the script as `__main__` as Python would.
It is a real process of its own, so signals, kills, exit codes, process trees and /proc read as they do for a
fresh interpreter. Only what Python does before the script's first line is skipped; where that could differ
(interpreter flags, `-c`/`-m`, an environment that changes how those libraries import) helpers.py starts a fresh
interpreter instead, as it does for every program when TESTS_FRESH_PROCESSES=1.

Protocol, one Unix-socket connection per program: the client sends a JSON request with the child's stdin,
stdout and stderr as attached file descriptors; the server answers the child's pid (8 bytes), and when the
child ends its wait status and CPU seconds (16 bytes); closing the connection early changes nothing.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys

# Environment variables read while these libraries import (thread pools, allocators, Python's own start-up,
# torch's and dynamo's import-time settings): a program whose environment differs from the server's in any of
# them is started fresh instead. (TORCHINDUCTOR_CACHE_DIR, which torch sets in the pytest process itself, and
# CUDA_VISIBLE_DEVICES are read later, in the program: the server never initialises CUDA.)
IMPORT_TIME_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "MALLOC", "LD_", "TORCH_",
                        "TORCHDYNAMO", "PYTORCH")
PRELOADED = ("numpy", "PIL.Image", "torch", "torch._dynamo", "torchvision", "torch.utils.tensorboard", "omegaconf",
             "hydra")
PID = struct.Struct("q")
END = struct.Struct("qd")  # wait status, CPU seconds (user + system, with the children it reaped)


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):  # a request longer than one read
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("request cut short")
        data += more
    return json.loads(data), fds


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the program, run it, exit as `python script args` would. Never returns."""
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        import runpy
        import threading

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            if stop.code is None:
                code = 0
            elif isinstance(stop.code, int):
                code = stop.code
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            code = -signal.SIGINT
        except BaseException:  # noqa: BLE001 - what Python does with any uncaught exception
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()  # Python's own finalisation: join the threads that are not daemons
        import atexit
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if code == -signal.SIGINT:  # as Python ends on an uncaught KeyboardInterrupt: killed by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        os._exit(code & 0xFF)


def serve(name: str) -> None:
    for module in PRELOADED:
        __import__(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)  # Linux's abstract namespace (argv cannot carry the leading NUL)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to the wake-up pipe
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)  # the client holds the other end: EOF when it is gone
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    selector.close()
                    for fd in (wake_read, wake_write):
                        os.close(fd)
                    listener.close()
                    for other in children.values():
                        other.close()
                    conn.close()
                    _run_child(request, fds)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                try:
                    conn.sendall(PID.pack(pid))
                except OSError:
                    pass
            elif key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 4096):
                    # The client (a pytest worker) ended: its programs end or run on by themselves. os._exit, not
                    # return: finalising the interpreter with torch loaded took 1.7 s, at the end of every session.
                    os._exit(0)
            else:
                try:
                    while os.read(wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
                while children:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    conn = children.pop(pid, None)
                    if conn is not None:
                        try:
                            conn.sendall(END.pack(status, usage.ru_utime + usage.ru_stime))
                        except OSError:
                            pass
                        conn.close()



# ---- the client: what helpers.py calls from a pytest process ----

def _receive_exactly(conn: socket.socket, size: int, cut_short: str) -> bytes:
    """`size` bytes from `conn`; RuntimeError(`cut_short`) if the server closes it first."""
    answer = b""
    while len(answer) < size:
        more = conn.recv(size - len(answer))
        if not more:
            raise RuntimeError(cut_short)
        answer += more
    return answer


class Server:
    """One server per pytest process, started at its first program and ended with the process."""

    def __init__(self, env: dict[str, str]):
        import secrets
        import subprocess

        self.env = import_time_environment(env)
        # A socket in Linux's abstract namespace: no file to clean up, whoever ends this process and however.
        self.name = f"tests-zygote-{os.getpid()}-{secrets.token_hex(8)}"
        self.process = subprocess.Popen([sys.executable, __file__, self.name], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline() != "ready\n":
            self.process.kill()
            raise RuntimeError(f"the program server did not start (exit {self.process.wait()})")
        self.reaped_cpu_seconds = 0.0

    def close(self) -> None:
        """End the server (at this pytest process's exit). Killed, not sent EOF: a process forked from this one
        and still running (a DataLoader worker) holds the server's stdin open too, and the EOF would not come
        until it ended; a session once waited here 10 s for it. The programs it started run on by themselves."""
        self.process.kill()
        self.process.wait()

    def serves(self, env: dict[str, str]) -> bool:
        return self.process.poll() is None and import_time_environment(env) == self.env

    def start(self, argv: list[str], cwd, env: dict[str, str], fds: list[int],
              new_session: bool) -> tuple[socket.socket, int]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect("\0" + self.name)
        request = json.dumps({"argv": argv, "cwd": os.fspath(cwd), "env": env, "new_session": new_session})
        socket.send_fds(conn, [request.encode() + b"\n"], fds)
        answer = _receive_exactly(conn, PID.size, "the program server closed the connection without starting the "
                                                   "program")
        return conn, PID.unpack(answer)[0]


class ForkedProgram:
    """What subprocess.Popen gives for a started program, for a program the server forked: pid, poll, wait,
    communicate, send_signal, terminate, kill, returncode, and stdout/stderr when they were pipes."""

    def __init__(self, server: Server, argv, cwd, env, stdin=None, stdout=None, stderr=None, text=False,
                 start_new_session=False):
        import subprocess

        self.args, self.returncode, self.cpu_seconds, self._server = argv, None, None, server
        close_after, ours = [], {}

        def target(spec, index):
            if spec is None:
                fd = os.open(os.devnull, os.O_RDWR) if index == 0 else os.dup(index)
            elif spec == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
            elif spec == subprocess.PIPE:
                read, write = os.pipe()
                fd, ours[index] = (read, write) if index == 0 else (write, read)
            elif spec == subprocess.STDOUT:
                return None
            elif isinstance(spec, int):
                return spec
            else:
                return spec.fileno()
            close_after.append(fd)
            return fd

        fds = [target(stdin, 0), target(stdout, 1), target(stderr, 2)]
        if fds[2] is None:
            fds[2] = fds[1]
        try:
            self._conn, self.pid = server.start([os.fspath(a) for a in argv], cwd, env, fds, start_new_session)
        finally:
            for fd in close_after:
                os.close(fd)
        self.stdin = os.fdopen(ours[0], "w" if text else "wb") if 0 in ours else None
        self.stdout = os.fdopen(ours[1], "r" if text else "rb") if 1 in ours else None
        self.stderr = os.fdopen(ours[2], "r" if text else "rb") if 2 in ours else None

    def _ended(self, block: bool, timeout: float | None = None) -> bool:
        import select

        if self.returncode is not None:
            return True
        if not block or timeout is not None:
            ready, _, _ = select.select([self._conn], [], [], 0 if not block else timeout)
            if not ready:
                return False
        status, cpu = END.unpack(_receive_exactly(self._conn, END.size,
                                                  f"the program server ended before program {self.pid} did"))
        self._conn.close()
        self.returncode, self.cpu_seconds = os.waitstatus_to_exitcode(status), cpu
        self._server.reaped_cpu_seconds += cpu
        return True

    def poll(self):
        self._ended(block=False)
        return self.returncode

    def wait(self, timeout: float | None = None):
        import subprocess

        if not self._ended(block=True, timeout=timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):
        import subprocess
        import threading
        import time

        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        results = {}

        def drain(name, stream):
            results[name] = stream.read()
            stream.close()

        readers = [threading.Thread(target=drain, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
