"""A ``--routes-file`` route measured on this host's KVM: ``bench`` runs the user's routes like
the bundled ones and checks that each took its path (examples/routes/mmio-virtio-notify.toml:
a matching 2-byte DATAMATCH store signals the eventfd, the other queue's exits to userspace)."""

from __future__ import annotations

import json
from pathlib import Path

from fastmmio import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "routes" / "mmio-virtio-notify.toml"


def test_bench_measures_user_routes_and_checks_their_paths(kvm_device, tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = cli.main(["bench", "mmio-virtio-notify", "mmio-virtio-notify-other-queue",
                       "--routes-file", str(EXAMPLE), "--device", kvm_device, "-n", "500",
                       "--runs", "3", "--seconds", "20", "--json", str(out)])
    _, err = capsys.readouterr()
    assert status == 0, err
    records = {r["route"]: r for r in json.loads(out.read_text()) if "route" in r}
    assert set(records) == {"mmio-virtio-notify", "mmio-virtio-notify-other-queue"}
    assert all(r["correct"] for r in records.values()), records
    # an exit to userspace and back costs more than a signal from the kernel
    assert records["mmio-virtio-notify-other-queue"]["cycles"] > records["mmio-virtio-notify"]["cycles"]
