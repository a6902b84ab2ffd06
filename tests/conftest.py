"""Shared pytest setup.

Tests that need a working KVM device live in ``tests/kvm/`` and carry the ``kvm`` marker (every
item collected there gets it automatically). They are skipped, with the reason, when
``/dev/kvm`` (or ``$FASTMMIO_KVM_DEVICE``) is missing or unusable: the device is opened, its
API version checked, and a VM with one vCPU created and destroyed, once per test session.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

KVM_DEVICE = os.environ.get("FASTMMIO_KVM_DEVICE", "/dev/kvm")
_KVM_DIR = Path(__file__).parent / "kvm"


@functools.lru_cache(maxsize=None)
def kvm_unusable_reason(device: str = KVM_DEVICE) -> str | None:
    """None when ``device`` can run a guest here, else one line saying why not."""
    if not os.path.exists(device):
        return f"{device} does not exist (no KVM on this host)"
    try:
        from fastmmio.errors import FastmmioError
        from fastmmio.real.objects import Kvm
    except ImportError as exc:  # pragma: no cover - the real backend not importable
        return f"fastmmio.real cannot be imported: {exc}"
    try:
        with Kvm(device) as kvm:
            with kvm.create_vm() as vm:
                vm.create_vcpu(0)
    except FastmmioError as exc:
        return f"{device} is unusable: {exc}"
    except OSError as exc:
        return f"{device} is unusable: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _KVM_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kvm)
        if ("dask_real_cluster" in getattr(item, "fixturenames", ())
                and item.nodeid.split("::", 1)[0] not in DASK_CLUSTER_FILES):
            raise pytest.UsageError(f"{item.nodeid} uses dask_real_cluster: add its file to "
                                    "DASK_CLUSTER_FILES in tests/conftest.py")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the long files first
        first = {path: i for i, path in enumerate(LONG_FILES)}
        items.sort(key=lambda item: first.get(item.nodeid.split("::", 1)[0], len(first)))
    kvm_items = [item for item in items if item.get_closest_marker("kvm")]
    if not kvm_items:
        return
    reason = kvm_unusable_reason()
    if reason:
        skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
        for item in kvm_items:
            item.add_marker(skip)


# The test files whose tests use the session's real Dask cluster (dask_real_cluster below).
DASK_CLUSTER_FILES = frozenset({"tests/kvm/test_fanout_kvm.py", "tests/unit/test_compare_dask.py",
                                "tests/unit/test_fanout.py"})


# The files that take longest (10-20 s each on a 2-core machine, most of it one or two tests),
# longest first: pytest-xdist workers collect them first and so are handed them first, and
# the many short files fill in at the end (only the order of the work changes).
LONG_FILES = (*sorted(DASK_CLUSTER_FILES), "tests/unit/test_sim_fast_exits.py",
              "tests/unit/test_interrupts.py", "tests/kvm/test_hostile.py",
              "tests/unit/test_fuzz_diff_programs.py", "tests/unit/test_user_variants.py",
              "tests/kvm/test_fuzz_differential.py", "tests/unit/test_report_html.py",
              "tests/unit/test_svm_property.py", "tests/unit/test_vmx_property.py")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown when it is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``pytest -n N --dist loadfile`` (as ``make test`` runs the suite): each test file runs
    on one worker, so that its module-scoped fixtures and shared draws are built once, and the
    files on the real Dask cluster run on one worker together, so that one cluster is started,
    not one per worker. Other ``--dist`` modes are pytest-xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    config.option.loadscopereorder = False  # the workers' order (LONG_FILES first), not by count
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "dask-real-cluster" if path in DASK_CLUSTER_FILES else path

    return FileScheduling(config, log)


@pytest.fixture
def kvm_device() -> str:
    """The KVM device path; skips the test when it is unusable."""
    reason = kvm_unusable_reason()
    if reason:
        pytest.skip(f"needs KVM: {reason}")
    return KVM_DEVICE


@pytest.fixture
def open_fds():
    """A function returning the set of this process's open file descriptors."""

    def snapshot() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    return snapshot


@pytest.fixture(scope="session")
def guest_cpl() -> int:
    """The CPL guests run at on this host (fastmmio.real.host: CPL3 on PVM, else CPL0)."""
    from fastmmio.real.host import detect_host

    return detect_host(KVM_DEVICE).guest_cpl


@pytest.fixture
def skip_unsupported(kvm_device):
    """A function that skips the test, with the reason, when this host cannot run a route at
    a CPL (fastmmio.real.host.unsupported_reason: a missing capability, VMCALL under
    PVM, a CPL0-only access at CPL3)."""
    from fastmmio.real.host import kvm_kind, unsupported_reason
    from fastmmio.real.objects import Kvm

    def check(route, cpl: int) -> None:
        with Kvm(kvm_device) as kvm:
            why = unsupported_reason(kvm, route, cpl, kvm_kind(device=kvm_device))
        if why:
            pytest.skip(why)

    return check


@pytest.fixture(autouse=True)
def _default_signal_handlers():
    """A test that ran the CLI in-process leaves its signal handlers installed (the CLI keeps
    them until the process exits); restore Python's defaults after every test."""
    yield
    from fastmmio import interrupts

    interrupts.uninstall()


@pytest.fixture(scope="session")
def dask_real_cluster():
    """One real Dask cluster for the whole session (tests/dask_cluster.py): a ``dask
    scheduler`` and two ``dask worker`` processes on 127.0.0.1, started on first use and
    stopped at the end of the session."""
    pytest.importorskip("distributed")
    from dask_cluster import real_cluster

    with real_cluster(2) as cluster:
        yield cluster
