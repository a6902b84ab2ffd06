"""#VMEXIT as data: what an intercept leaves in the VMCB control area (APM 15.6, 15.7.1).

:class:`SvmExit` carries EXITCODE, EXITINFO1, EXITINFO2, the next sequential RIP (nRIP, VMCB
C8h; 15.7.1) and the guest instruction bytes (VMCB 0D0h; 15.8.4). ``next_rip`` 0 means
"reset to zero", as the APM says it is for every intercept it does not list.
``insn_bytes`` is None when the processor does not implement DecodeAssists (the field is not
written); otherwise the bytes recorded, possibly none (count 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.svm.layouts import (
    EXIT_IOIO,
    EXIT_NPF,
    GUEST_INSN_BYTES_MAX,
    IOIO_EXITINFO1,
    NPF_EXITINFO1,
    exit_name,
)


@dataclass(frozen=True)
class SvmExit:
    """The exit information of one #VMEXIT."""

    code: int
    exitinfo1: int = 0
    exitinfo2: int = 0
    next_rip: int = 0
    insn_bytes: bytes | None = None

    def __post_init__(self) -> None:
        exit_name(self.code)  # raises for an unknown code
        if self.insn_bytes is not None and len(self.insn_bytes) > GUEST_INSN_BYTES_MAX:
            raise SvmError(f"at most {GUEST_INSN_BYTES_MAX} instruction bytes "
                           f"(APM 15.8.4), got {len(self.insn_bytes)}")

    @property
    def name(self) -> str:
        return exit_name(self.code)

    @property
    def insn_count(self) -> int:
        """The count in bits 3:0 of the guest-instruction-bytes field (0 when absent)."""
        return len(self.insn_bytes) if self.insn_bytes else 0

    def describe(self) -> str:
        parts = [f"#VMEXIT {self.code:#x} {self.name}"]
        if self.code == EXIT_NPF:
            parts.append(NPF_EXITINFO1.describe(self.exitinfo1))
            parts.append(f"gpa={self.exitinfo2:#x}")
        elif self.code == EXIT_IOIO:
            parts.append(IOIO_EXITINFO1.describe(self.exitinfo1))
            parts.append(f"exitinfo2(next rip)={self.exitinfo2:#x}")
        else:
            if self.exitinfo1:
                parts.append(f"exitinfo1={self.exitinfo1:#x}")
            if self.exitinfo2:
                parts.append(f"exitinfo2={self.exitinfo2:#x}")
        parts.append(f"nrip={self.next_rip:#x}")
        if self.insn_bytes is not None:
            parts.append(f"insn_bytes={self.insn_count}:{self.insn_bytes.hex()}")
        return "; ".join(parts)
