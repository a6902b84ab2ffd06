"""Standard output and the working directory of the commands that need /dev/kvm: ``bench
--json -`` writes the JSON to standard output (not a file named ``-``), and ``fastmmio fuzz
diff`` leaves no ``.hypothesis/`` folder in the working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
