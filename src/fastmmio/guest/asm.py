"""A tiny label-aware assembler over iced-x86's ``Instruction.create*`` and ``BlockEncoder``.

Labels use iced's convention: a branch whose target equals another instruction's ``ip`` in
the same block is resolved by :class:`iced_x86.BlockEncoder`. Instructions get sequential
placeholder IPs here (far from any guest address) and the block is then encoded at its real
guest-physical address.
"""

from __future__ import annotations

from iced_x86 import BlockEncoder, Code, Decoder, Formatter, FormatterSyntax, Instruction

_IP_BASE = 0x7FFF_0000_0000  # placeholder IP space
_IP_STEP = 16


class Asm:
    """Collects instructions; ``label()``, ``bind(label)`` and ``branch(code, label)``."""

    def __init__(self) -> None:
        self._items: list[Instruction] = []
        self._pending: list[int] = []
        self._bound: dict[int, int] = {}  # label -> placeholder IP of its instruction
        self._labels = 0
        self._fixups: list[tuple[Instruction, int]] = []

    def label(self) -> int:
        """A new, not yet bound label."""
        self._labels += 1
        return self._labels

    def bind(self, label: int) -> None:
        """Bind ``label`` to the next emitted instruction."""
        if label in self._bound or label in self._pending:
            raise ValueError(f"label {label} bound twice")
        self._pending.append(label)

    def emit(self, instr: Instruction) -> None:
        ip = _IP_BASE + len(self._items) * _IP_STEP
        for label in self._pending:
            self._bound[label] = ip
        self._pending.clear()
        instr.ip = ip
        self._items.append(instr)

    def branch(self, code: Code, label: int) -> None:
        """A near/short jump or Jcc to ``label`` (resolved in :meth:`encode`)."""
        ins = Instruction.create_branch(code, 0)
        self.emit(ins)
        self._fixups.append((ins, label))

    def __len__(self) -> int:
        return len(self._items)

    def encode(self, base: int) -> bytes:
        """Encode every instruction at guest address ``base``; short branches are widened
        if needed."""
        if self._pending:
            raise ValueError("a label is bound after the last instruction")
        for ins, label in self._fixups:
            if label not in self._bound:
                raise ValueError(f"branch to unbound label {label}")
            ins.near_branch64 = self._bound[label]
        enc = BlockEncoder(64)
        enc.add_many(self._items)
        return enc.encode(base)


def disassemble(code: bytes, base: int) -> list[str]:
    """Intel-syntax listing, one ``address: text`` line per instruction."""
    fmt = Formatter(FormatterSyntax.INTEL)
    return [f"{ins.ip:#x}: {fmt.format(ins)}" for ins in Decoder(64, code, ip=base)]
