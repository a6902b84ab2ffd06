"""A minimal SVM machine for tests: the VMX :class:`~fastmmio.sim.vmx.testbed.Testbed` with
nested page tables (x86 long-mode format, in host memory) instead of EPT, and an
:class:`~fastmmio.sim.svm.processor.SvmProcessor` with nCR3 at their root."""

from __future__ import annotations

from typing import Any

from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.svm.processor import SvmProcessor
from fastmmio.sim.vmx.tables import PageTableBuilder
from fastmmio.sim.vmx.testbed import Testbed


class SvmTestbed(Testbed):
    """Guest RAM ``[0, ram_size)`` with nested tables mapping it (``npt``, also ``ept`` for
    the shared helpers: ``map_ept_ram`` takes ``w``, ``us``, ``xd`` here) and guest tables
    (``guest``). ``proc`` is the SVM processor."""

    __test__ = False

    def __init__(self, config: Any = "apm-max", ram_size: int = 1 << 30,
                 maxphyaddr: int = 46, **proc_kw: Any):
        super().__init__(config, ram_size, maxphyaddr, **proc_kw)

    @property
    def npt(self) -> PageTableBuilder:
        return self.ept

    def _second_level_builder(self) -> PageTableBuilder:
        # nested tables have the guest's format; "guest" here names the x86 entry format
        return PageTableBuilder("guest", self.alloc.alloc_page(), self.memory.read_u64,
                                self.memory.write_u64, self.alloc.alloc_page)

    def _make_processor(self, config: Any, ept_ad: bool, **proc_kw: Any) -> SvmProcessor:
        if ept_ad:
            raise SvmError("nested paging always maintains A/D flags; ept_ad is VMX's")
        proc = SvmProcessor(self.memory, config, **proc_kw)
        proc.set_ncr3(self.ept.root)
        return proc
