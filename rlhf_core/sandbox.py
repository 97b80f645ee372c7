"""Run untrusted Python (a policy's code, a tool call) against test statements, never in our process.

One call of :func:`run_tests` runs in a process tree of its own::

    trainer --(new session)--> unshare --> harness (PID 1 of new pid/net/mount namespaces)
                                             `--> one child per test: the code, then that test

The harness is this very file, run as a script (``python -I -S sandbox.py``; stdlib only, so the
trainer's packages are never imported there). It builds a new root from the call's fresh temp
directory with read-only binds of the system and interpreter directories, chroots into it, and for
each test forks a child that drops every privilege, sets its resource limits, executes the code and
then the test. A test passes only when its child writes that test's random token to a private
pipe and exits 0, so printing "passed", exiting early or crashing cannot pass it. After every test
the harness kills whatever the child left running (``kill(-1)`` from PID 1 reaches the whole pid
namespace and nothing outside it).

What each child gets, by isolation mode (:func:`isolation_mode`, probed once per process):

``namespaces`` (Linux with ``unshare``)
    no network (a new, empty network namespace); a filesystem of the temp dir plus read-only
    ``/usr``, ``/lib*``, ``/bin``, ``/sbin`` and the interpreter's prefix (no ``/etc``, ``/home``,
    ``/proc``, ``/root`` or anything else of the host); no process of the host visible or
    signalable; no capabilities (a trainer running as root runs each call under a fresh random
    uid; a non-root trainer maps itself to root of a new user namespace and the child drops every
    capability), so ``RLIMIT_NPROC`` counts that call's processes only.
``none`` (the fallback, logged once as a warning)
    resource limits, a fresh working directory, an empty environment and the intermediate harness
    only: the code can read what the trainer's user can read and open network connections, a
    process that calls ``setsid`` escapes the clean-up, and ``RLIMIT_NPROC`` counts every process
    of the user (the limit is set to those already running plus ``max_processes``; none as root).

Always: an empty environment (``PATH``, ``HOME``/``TMPDIR`` = the work dir), ``RLIMIT_CPU``,
``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC`` and no core files per child, a wall-clock
``timeout`` for the whole call (the tests that did not finish in it fail), stdout/stderr kept up to
:data:`OUTPUT_LIMIT` bytes each, and the temp directory removed afterwards.

Not guarded: the tests run in the same interpreter as the code, so code written to defeat
assertions (an object whose ``__eq__`` always answers True, patched builtins, digging the token
out of the caller's frame) can pass them; untrusted tests are as dangerous as untrusted code;
disk use inside the temp dir is bounded per file (``file_size_mb``), not in total.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

#: Bytes of each of stdout and stderr kept in a :class:`SandboxResult`.
OUTPUT_LIMIT = 8192
#: Seconds allowed on top of ``timeout`` for starting the sandbox and collecting its result.
STARTUP_GRACE = 5.0
#: The work directory (cwd, ``HOME``, ``TMPDIR``) as the code sees it in ``namespaces`` mode.
WORK_DIR = "/tmp"

# Host directories bound read-only into the new root (where they exist), beside the interpreter's.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ERROR_CHARS = 300  # of an exception message a child reports
# Linux mount(2) flags (<sys/mount.h>); the statvfs ST_* flags share these values.
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC = 32, 4096, 16384
_MS_KEPT = 2 | 4 | 8 | 1024 | 2048 | 4096  # nosuid nodev noexec noatime nodiratime relatime
_PR_CAPBSET_DROP, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 24, 4, 38
_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed call.

    ``timeout``: wall-clock seconds for the whole call (the code once per test, then the test);
    ``cpu_seconds``, ``memory_mb`` (address space) and ``file_size_mb`` (largest file written,
    stdout/stderr included) bind each process; ``max_processes``: processes the code may have at
    once, itself included.
    """

    timeout: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 16
    file_size_mb: int = 16

    def __post_init__(self) -> None:
        for name, minimum in _LIMIT_MINIMUMS.items():
            _check_limit(name, getattr(self, name), minimum)


_LIMIT_MINIMUMS = {"timeout": 0.1, "cpu_seconds": 1, "memory_mb": 64, "max_processes": 1, "file_size_mb": 1}


def _check_limit(name: str, value: object, minimum: float) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number >= ``minimum`` (an integer
    for every limit but ``timeout``)."""
    kinds = (int, float) if isinstance(minimum, float) else (int,)
    what = "a number" if isinstance(minimum, float) else "an integer"
    if isinstance(value, bool) or not isinstance(value, kinds) or not minimum <= value < float("inf"):
        raise ValueError(f"{name} must be {what} >= {minimum} (and finite), got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What one call of :func:`run_tests` found. ``error``: why the first failing test failed
    ("" when all passed); ``isolation``: the mode it ran in (see the module docstring)."""

    passed: int
    total: int
    timed_out: bool
    error: str
    stdout: str
    stderr: str
    isolation: str

    @property
    def fraction(self) -> float:
        """``passed / total`` (0.0 without tests)."""
        return self.passed / self.total if self.total else 0.0


def run_tests(code: str, tests: Sequence[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Execute ``code`` and then each of ``tests`` (Python statements, e.g. ``assert f(1) == 2``) in a
    fresh sandbox process per test; a test passes when it runs to its end without an exception."""
    return _run(code, list(tests), limits, isolation_mode())


def run_tests_batch(
    jobs: Sequence[tuple[str, Sequence[str]]], limits: SandboxLimits = SandboxLimits(), max_workers: int = 4,
) -> list[SandboxResult]:
    """:func:`run_tests` for each ``(code, tests)`` of ``jobs``, at most ``max_workers`` sandboxes at a
    time; results in the order of ``jobs``."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    mode = isolation_mode()  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        return list(pool.map(lambda job: _run(job[0], list(job[1]), limits, mode), jobs))


_mode: str | None = None
_mode_lock = threading.Lock()


def isolation_mode() -> str:
    """``"namespaces"`` if this machine lets a sandbox run in new user/pid/net/mount namespaces
    (tried once per process, with a real one-test call), else ``"none"``, with a warning saying
    what the fallback does not guard."""
    global _mode
    with _mode_lock:
        if _mode is None:
            _mode = _probe_isolation()
        return _mode


def _probe_isolation() -> str:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        why = "not Linux" if sys.platform != "linux" else "no `unshare` on PATH"
    else:
        probe = _run("", ["assert True"], SandboxLimits(timeout=20.0), "namespaces")
        if probe.passed == 1:
            return "namespaces"
        why = (probe.error + " " + probe.stderr.strip()[-500:]).strip()
    logger.warning(
        "sandbox: Linux namespaces are not available (%s); untrusted code runs with resource limits "
        "only: it can read what this user can read, reach the network, and RLIMIT_NPROC counts every "
        "process of the user", why)
    return "none"


def _run(code: str, tests: list[str], limits: SandboxLimits, mode: str) -> SandboxResult:
    """One sandboxed call in ``mode``, in its own temp directory (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-") as tmp:
        uid = 100_000 + secrets.randbelow(2**30) if mode == "namespaces" and os.geteuid() == 0 else None
        root = os.path.join(tmp, "root")  # "/" of the code in namespaces mode
        work = root + WORK_DIR
        os.makedirs(work, mode=0o700)
        os.chmod(root, 0o755)
        if uid is not None:
            os.chown(work, uid, uid)
        job = {"code": code, "tests": tests, "limits": asdict(limits), "isolated": mode == "namespaces",
               "root": root, "work": work, "uid": uid}
        out_path, err_path, result_path = (os.path.join(tmp, name) for name in ("stdout", "stderr", "result"))
        with open(out_path, "wb") as out, open(err_path, "wb") as err, open(result_path, "wb") as result:
            job["stdout_fd"] = out.fileno()
            proc = subprocess.Popen(
                _command(mode), stdin=subprocess.PIPE, stdout=result, stderr=err, pass_fds=(out.fileno(),),
                cwd=work, env=_environment(work if mode == "none" else WORK_DIR), start_new_session=True,
            )
            try:
                proc.communicate(json.dumps(job).encode(), timeout=limits.timeout + STARTUP_GRACE)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
            finally:
                _kill_group(proc.pid)  # anything a fallback-mode child left behind in the group
        return _collect(result_path, out_path, err_path, len(tests), proc.returncode, mode)


def _command(mode: str) -> list[str]:
    harness = [sys.executable, "-I", "-S", os.path.abspath(__file__)]
    if mode == "none":
        return harness
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--net", "--pid", "--fork", "--kill-child", *harness]


def _environment(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(
    result_path: str, out_path: str, err_path: str, total: int, returncode: int | None, mode: str,
) -> SandboxResult:
    """Read back the harness's report (written to a file the code never sees)."""
    stdout, stderr = _head(out_path), _head(err_path)
    try:
        with open(result_path, encoding="utf-8") as f:
            report = json.load(f)
        outcomes = report["tests"]
    except (OSError, ValueError, KeyError, TypeError):
        return SandboxResult(0, total, False, f"the sandbox ended without a result (exit status {returncode})",
                             stdout, stderr, mode)
    passed = sum(1 for o in outcomes if o["passed"])
    timed_out = any(o["timed_out"] for o in outcomes)
    error = next((o["error"] for o in outcomes if not o["passed"]), "")
    return SandboxResult(passed, total, timed_out, error, stdout, stderr, mode)


def _head(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(OUTPUT_LIMIT).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# The harness: runs as ``python -I -S sandbox.py``, inside the sandbox, reading the job on stdin.
# ---------------------------------------------------------------------------------------------


def _harness_main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    os.close(0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # PID 1 ignores signals it has no handler for
    deadline = time.monotonic() + job["limits"]["timeout"]
    if job["isolated"]:
        _enter_root(job["root"])
        _prctl(_PR_SET_DUMPABLE, 0)  # children cannot read the harness's memory (the tokens)
    outcomes = []
    for test in job["tests"]:
        outcomes.append(_run_one(job, test, deadline))
    json.dump({"tests": outcomes}, sys.stdout)
    sys.stdout.flush()


def _run_one(job: dict, test: str, deadline: float) -> dict:
    """Fork a child for ``test``, wait for it until ``deadline``, then kill what it left."""
    if time.monotonic() >= deadline:
        return {"passed": False, "timed_out": True, "error": "not run: the time limit was spent"}
    token = secrets.token_bytes(16)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(job, test, write_end, token)
    os.close(write_end)
    status = _wait(pid, deadline)
    _kill_leftovers(pid, job["isolated"])
    report = _drain(read_end)
    os.close(read_end)
    if status is None:
        return {"passed": False, "timed_out": True, "error": f"timed out after {job['limits']['timeout']} s"}
    if report == token and os.waitstatus_to_exitcode(status) == 0:
        return {"passed": True, "timed_out": False, "error": ""}
    if report.startswith(b"E"):
        error = report[1:].decode("utf-8", errors="replace")
    elif os.WIFSIGNALED(status):
        error = f"killed by {signal.Signals(os.WTERMSIG(status)).name} (a CPU, memory or file size limit?)"
    else:
        error = f"exited with status {os.waitstatus_to_exitcode(status)} before the test finished"
    return {"passed": False, "timed_out": False, "error": error}


def _wait(pid: int, deadline: float) -> int | None:
    """The child's wait status, or None if it was still running at ``deadline``."""
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.02)


def _kill_leftovers(pid: int, isolated: bool) -> None:
    """Kill the child and everything it started: as PID 1, ``kill(-1)`` reaches every process of
    the namespace but the harness; in the fallback only the child's process group."""
    try:
        if isolated:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        while os.waitpid(-1 if isolated else pid, 0):
            pass
    except ChildProcessError:
        pass


def _drain(fd: int) -> bytes:
    """What the child wrote (at most 1 KiB); never blocks on a writer left alive in the fallback."""
    os.set_blocking(fd, False)
    chunks = b""
    while len(chunks) < 1024 and select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 1024)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks += chunk
    return chunks[:1024]


def _child(job: dict, test: str, report_fd: int, token: bytes) -> None:
    """In the forked child: isolate, limit, run the code and the test, report. Never returns."""
    try:
        os.dup2(job["stdout_fd"], 1)
        os.close(job["stdout_fd"])
        os.setpgid(0, 0)  # the code's killpg(0) stays in its own group
        os.chdir(WORK_DIR if job["isolated"] else job["work"])
        _drop_privileges(job["uid"], job["isolated"])
        _set_limits(job["limits"], job["isolated"], job["uid"])
    except BaseException as exc:  # noqa: BLE001 - a sandbox that cannot be set up runs nothing
        _report(report_fd, f"Esandbox setup failed: {exc!r}"[:_ERROR_CHARS].encode(), 70)
    try:
        namespace = {"__name__": "__solution__", "__builtins__": __builtins__}
        exec(compile(job["code"], "<response>", "exec"), namespace)
        exec(compile(test, "<test>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - any way the code or test stops is a failure
        _flush()
        _report(report_fd, f"E{type(exc).__name__}: {exc}"[:_ERROR_CHARS].encode("utf-8", errors="replace"), 1)
    _flush()
    _report(report_fd, token, 0)


def _report(fd: int, message: bytes, status: int) -> None:
    """Write the child's report and exit; a harness that is gone (the fallback) means no verdict."""
    try:
        os.write(fd, message)
    except OSError:
        os._exit(1)
    os._exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the code may have replaced or closed them
            pass


def _set_limits(limits: dict, isolated: bool, uid: int | None) -> None:
    mib = 1024 * 1024
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (_process_limit(limits["max_processes"], isolated, uid),) * 2)


def _process_limit(max_processes: int, isolated: bool, uid: int | None) -> int:
    """RLIMIT_NPROC counts processes per user (per user namespace): a fresh uid counts only this
    call's; a new user namespace also counts unshare and the harness; the fallback counts them all."""
    if uid is not None:
        return max_processes
    if isolated:
        return max_processes + 2
    mine = os.getuid()
    running = sum(1 for entry in os.listdir("/proc") if entry.isdigit() and _owner(f"/proc/{entry}") == mine)
    return running + max_processes


def _owner(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def _drop_privileges(uid: int | None, isolated: bool) -> None:
    """Root trainer: become the call's own unprivileged uid. Non-root trainer in a user namespace:
    stay its root but give up every capability, for good (bounding set emptied)."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif isolated:
        for cap in range(64):
            if _prctl(_PR_CAPBSET_DROP, cap, check=False) != 0:
                break
        _capset_empty()
    if isolated or uid is not None:
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int, check: bool = True) -> int:
    libc = _libc()
    rc = libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if rc != 0 and check:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")
    return rc


def _capset_empty() -> None:
    libc = _libc()
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = _libc()
    src = source.encode() if source is not None else None
    if libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} -> {target}: {os.strerror(errno)}")


def _enter_root(root: str) -> None:
    """Make ``root`` the filesystem: the system and interpreter directories bound read-only (so
    setuid programs are inert too), ``/dev/null``, then chroot. The mount namespace is private, so
    none of this is seen outside."""
    prefix = os.path.realpath(sys.base_prefix)
    sources = list(_SYSTEM_DIRS)
    if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS if not os.path.islink(d)):
        sources.append(prefix)
    for source in sources:
        target = root + source
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            os.makedirs(target, mode=0o755, exist_ok=True)
            _mount(source, target, _MS_BIND | _MS_REC)
            kept = os.statvfs(source).f_flag & _MS_KEPT
            _mount(None, target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept)
    os.makedirs(root + "/dev", mode=0o755)
    open(root + "/dev/null", "w").close()
    _mount("/dev/null", root + "/dev/null", _MS_BIND)
    os.chroot(root)
    os.chdir("/")


if __name__ == "__main__":
    _harness_main()
