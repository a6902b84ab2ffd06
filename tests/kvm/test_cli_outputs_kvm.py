"""Standard output and the working directory of the commands that need /dev/kvm: ``bench
--json -`` writes the JSON to standard output (not a file named ``-``), and ``fastmmio fuzz
diff`` leaves no ``.hypothesis/`` folder in the working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastmmio.real.binding import KVM_RUN
from tests.conftest import KVM_DEVICE


def _fastmmio(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_STORAGE_DIRECTORY"}
    env["XDG_CACHE_HOME"] = str(cwd / "cache")
    return subprocess.run([sys.executable, "-m", "fastmmio", *argv], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def test_bench_json_dash_is_stdout(tmp_path: Path):
    proc = _fastmmio(tmp_path, "bench", "--device", KVM_DEVICE, "--json", "-", "-n", "64",
                     "-r", "1", "empty")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)  # the JSON alone, no table around it
    assert "host" in records[0] and records[1]["route"] == "empty"
    assert not (tmp_path / "-").exists()


def test_fuzz_diff_leaves_no_hypothesis_folder_in_the_cwd(tmp_path: Path):
    proc = _fastmmio(tmp_path, "fuzz", "diff", "--device", KVM_DEVICE, "--examples", "3",
                     "--seconds", "60", "--max-ops", "3", "--no-save", "--seed", "1")
    assert proc.returncode in (0, 1), proc.stderr
    assert not (tmp_path / ".hypothesis").exists()
    assert (tmp_path / "cache" / "fastmmio" / "hypothesis").is_dir()


def _in_kvm_run(pid: int) -> bool:
    """A thread of ``pid`` is in ioctl(2) (x86-64 syscall 16) with request KVM_RUN, as
    /proc/PID/task/TID/syscall shows it (proc(5): number, then the arguments)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:  # the thread ended, or its syscall is not readable
            continue
        if fields[:1] == ["16"] and len(fields) > 2 and int(fields[2], 16) == KVM_RUN:
            return True
    return False


def _interrupt_long_bench(tmp_path: Path, signum: int) -> tuple[int, float, str]:
    """A batch of 10^8 userspace exits (minutes), signalled once it runs."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fastmmio", "bench", "--device", KVM_DEVICE,
                             "-n", "100000000", "-r", "1", "pio-user"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # started, inside KVM_RUN / the compiled run loop: a vCPU thread was seen in KVM_RUN,
        # and the batch has gone on for a moment since (a signal sooner would be caught by
        # whatever came before the batch)
        deadline = time.monotonic() + 60
        while not _in_kvm_run(proc.pid):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the bench never entered KVM_RUN"
            time.sleep(0.01)
        time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()
        t0 = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        return proc.returncode, time.monotonic() - t0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_stops_a_long_kvm_batch(tmp_path: Path):
    """SIGINT and SIGTERM reach the vCPU thread even when the kernel gives them to another
    thread of the process (fastmmio.interrupts forwards them), so KVM_RUN returns EINTR and
    the compiled run loop goes back to Python: exit 130 within a second, one line."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        status, latency, err = _interrupt_long_bench(tmp_path, signum)
        if status == 130 and latency >= 1.0:  # a busy shared machine: once more
            status, latency, err = _interrupt_long_bench(tmp_path, signum)
        assert status == 130, err
        assert latency < 1.0, f"{latency:.2f} s"
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("fastmmio bench: ") and "Traceback" not in err, err
