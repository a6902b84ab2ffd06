"""The guest's CPU: unicorn executes the guest image, the processor model translates.

unicorn runs in ``UC_TLB_VIRTUAL`` mode: every translation it needs comes from
:meth:`Processor.translate` through the ``UC_HOOK_TLB_FILL`` hook, so the processor model sees
(and counts) every walk, and decides every EPT violation and misconfiguration. unicorn's
physical address space *is* the model's host-physical memory: every page of
:class:`~fastmmio.sim.vmx.memory.HostMemory` that backs a memslot is mapped into unicorn with
``mem_map_ptr`` over the same ``bytearray``, so guest stores and the model's reads see one
memory.

What becomes a VM exit, and how it is delivered to the hypervisor model (``handler``):

* a refused translation (EPT violation or misconfiguration): unicorn stops with RIP on the
  faulting instruction; the exit information (qualification, GPA, GLA, and the instruction
  length the processor writes although the SDM leaves it undefined, 27.2.4) goes to
  ``handler.ept_exit``; the handler may change registers (skip, emulate) before re-entry.
  With ``fast_exits`` a plain ``MOV`` store's exit is handled inside the fill hook instead,
  and when the handler's answer is a skip the store lands in a sink page and unicorn runs on
  without stopping (:meth:`GuestCpu._fast_ept_exit`; same events, same order);
* ``IN``/``OUT`` (I/O instruction, reason 30) and ``CPUID`` (10): hooked where they execute,
  handled inline, and the guest continues (KVM's fast PIO and CPUID paths re-enter at once);
* ``VMCALL`` (18): unconditional in VMX non-root operation at any CPL (SDM 25.1.2); unicorn
  has no VMX and refuses it as an invalid instruction, which stops it on the VMCALL: that
  stop is the exit (``handler.vmcall_exit``), with instruction length 3;
* ``MOV`` to or from ``CR8`` causes no exit: KVM runs its guests with the TPR shadow ("use TPR
  shadow", SDM 25.1.3), under which MOV from CR8 reads the virtual TPR and MOV to CR8 writes
  it (SDM 29.3), exiting only when the new value drops below the TPR threshold (which is 0
  when no interrupt is pending, as here); unicorn executes them itself;
* a guest exception (#PF, #GP, #UD, ...): the guest image installs no handlers, so delivery
  fails into a triple fault, as on the real KVM here: the CPU stops with ``shutdown``.

unicorn keeps a TLB of its own in front of the model. It is flushed at every VM exit and
entry, so after each entry the first access to every page asks the model again (a hit in the
model's TLB, or a walk when the model has invalidated, e.g. with VPID off); between exits,
repeated accesses to a page are served by unicorn's TLB, which stands for a hit in the model's
combined TLB (guest programs here touch a few pages, so no capacity eviction is lost). After
a flush unicorn asks for the code page's translation again before it runs the next
translated block, so instruction fetches are walked like data accesses.

With no combined TLB at all (cache configuration ``none``) unicorn's TLB must not stand in
for one, or a notification would walk its code page once instead of once per instruction
(and a repeated data access once per exit): in that configuration only, a per-instruction
hook has the model translate every instruction's fetch (both pages of one that crosses a
page boundary) and drops unicorn's TLB before the instruction runs, so its data accesses ask
the model too. A fetch unicorn itself has just asked for (its fill at the start of a
translated block) is that instruction's fetch and is not translated twice. Other
configurations keep the one hook-free path.

unicorn itself runs at CPL0; the guest's CPL (3 on a PVM host) is the model's, which applies
the U/S rules of every walk. An I/O-instruction hook cannot stop unicorn at the next
instruction by itself (the stop takes effect at the end of the translated block); a code hook
on the next instruction makes unicorn check for the stop before running it, so with a code
hook over the guest's code (the session's per-instruction count, or the native no-op hook of
:meth:`GuestCpu.count_instructions`) a stop requested from a hook (the guest's final ``OUT``
to the done port) leaves RIP on the next instruction. Guest programs end a batch with
``OUT`` followed by a jump.

Set-up once: a :class:`CpuEngine` (the unicorn engine with the memslot pages mapped into it)
outlives its guest when a pool keeps it (:class:`fastmmio.sim.backend.EnginePool`); the next
guest of the same machine shape resets it (:meth:`CpuEngine.reset`) and adds its own hooks.
"""

from __future__ import annotations

import ctypes
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

from iced_x86 import (
    Code,
    Decoder,
    Instruction,
    MemorySizeExt,
    Mnemonic,
    OpKind,
    Register,
    RegisterExt,
)
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_ERR_INSN_INVALID,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn import x86_const as X

try:  # the binding's ctypes library: registers read and written without per-call set-up
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:  # pragma: no cover - another binding layout: use the public API
    _uclib = None

from fastmmio import interrupts as _interrupts
from fastmmio.deadline import DeadlineTimer
from fastmmio.image import BootState
from fastmmio.sim.vmx.exits import (
    EXIT_CPUID,
    EXIT_IO_INSTRUCTION,
    EXIT_VMCALL,
    ExitInfo,
    io_qualification,
)
from fastmmio.sim.vmx.layouts import QUAL_TRANSLATED
from fastmmio.sim.vmx.memory import PAGE_SIZE, HostMemory
from fastmmio.sim.vmx.processor import FETCH, READ, WRITE, Fault, Processor
from fastmmio.sim.vmx.walker import VM_EXIT_KINDS

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_UC_GPRS = tuple(getattr(X, f"UC_X86_REG_{r.upper()}") for r in GPRS)
_UC_REGS = _UC_GPRS + (X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS)
_REG_NAMES = GPRS + ("rip", "rflags")
_UC_BY_NAME = dict(zip(_REG_NAMES, _UC_REGS))
_UC_RIP, _UC_RAX = X.UC_X86_REG_RIP, X.UC_X86_REG_RAX

# unicorn's memory access types in the TLB-fill hook (uc_mem_type)
_UC_MEM_READ, _UC_MEM_WRITE, _UC_MEM_FETCH = 16, 17, 18
_ACCESS = {_UC_MEM_READ: READ, _UC_MEM_WRITE: WRITE, _UC_MEM_FETCH: FETCH}
_PERMS = {READ: UC_PROT_READ, WRITE: UC_PROT_READ | UC_PROT_WRITE, FETCH: UC_PROT_EXEC}

# emu_start's "until": an address guest code never reaches. unicorn translates its page when
# it stops; that translation is served from a scratch page outside the model's memory and
# never reaches the processor model. (GuestCpu enables unicorn's exit list, empty, so that
# "until" is ignored: unicorn then does not translate it at every emu_start, which after each
# exit's TLB flush was one more TLB-fill callback into Python per exit. Emulation ends only by
# a stop: a refused fill, a hook's emu_stop, HLT, an exception, the budget or the watchdog.)
_END = 0x1
_END_PAGE = _END >> 12
# uc_ctl code for "write: flush the TLB" (op WRITE in bits 31:30, no arguments), as the
# binding's Uc.ctl encodes it
_CTL_TLB_FLUSH_W = (UC_CTL_IO_WRITE << 30) | UC_CTL_TLB_FLUSH
_SCRATCH_HPA = (1 << 46) - 0x1000
_NATIVE_NOOP = (ctypes.cast(_uclib.uc_arch_supported, ctypes.c_void_p)
                if _uclib is not None else None)  # see GuestCpu.count_instructions
_SINK_HPA = (1 << 46) - 0x2000
_UNDECODED = object()


def _raw_entry(name: str):
    """unicorn's C function ``name`` (returning ``uc_err``) through a bare ctypes prototype
    without argument types: callers pass pointers as ``c_void_p`` objects made once and
    integers that fit a C ``int``. (The binding's prototypes convert every argument through
    its declared class, which costs more than the call on the per-exit path.) None without
    the library."""
    if _uclib is None:  # pragma: no cover
        return None
    address = ctypes.cast(getattr(_uclib, name), ctypes.c_void_p).value
    return ctypes.CFUNCTYPE(ctypes.c_int)(address)


_VP, _I32 = ctypes.c_void_p, ctypes.c_int


try:  # C callbacks for the exit path (optional: built by pip when a C compiler is there)
    from fastmmio.sim import _hooks
except ImportError:  # pragma: no cover - no compiler at install time: Python callbacks
    _hooks = None


class _SinkData(ctypes.Structure):
    """``struct sink`` of ``_hooks.c``: the sink callback's user data."""

    _fields_ = (("ctl", ctypes.c_void_p), ("control", ctypes.c_int))


if _hooks is not None and ctypes.sizeof(_SinkData) != _hooks.SINK_DATA_SIZE:  # pragma: no cover
    _hooks = None  # (a layout that does not match: do not hand it to C)


class _TlbEntry(ctypes.Structure):
    """unicorn's ``uc_tlb_entry`` (include/unicorn/unicorn.h, 2.1)."""

    _fields_ = (("paddr", ctypes.c_uint64), ("perms", ctypes.c_uint32))


# The C prototypes of the hooks every exit goes through (include/unicorn/unicorn.h: the
# engine handle first, user data last), called by unicorn straight into GuestCpu's methods.
_HOOK_CODE = ctypes.CFUNCTYPE(None, _VP, ctypes.c_uint64, ctypes.c_uint32, _VP)
_HOOK_TLB_FILL = ctypes.CFUNCTYPE(ctypes.c_bool, _VP, ctypes.c_uint64, _I32, _VP, _VP)
_HOOK_OUT = ctypes.CFUNCTYPE(None, _VP, ctypes.c_uint32, _I32, ctypes.c_uint32, _VP)
_HOOK_IN = ctypes.CFUNCTYPE(ctypes.c_uint32, _VP, ctypes.c_uint32, _I32, _VP)
_MMIO_READ = ctypes.CFUNCTYPE(ctypes.c_uint64, _VP, ctypes.c_uint64, ctypes.c_uint, _VP)
_MMIO_WRITE = ctypes.CFUNCTYPE(None, _VP, ctypes.c_uint64, ctypes.c_uint, ctypes.c_uint64, _VP)
_uc_reg_read = _raw_entry("uc_reg_read")  # (uc, int regid, void *value)
_uc_reg_write = _raw_entry("uc_reg_write")  # (uc, int regid, const void *value)
_uc_ctl = _raw_entry("uc_ctl")  # (uc, int control): controls without arguments only
_uc_reg_read_batch = _raw_entry("uc_reg_read_batch")  # (uc, int *ids, void **values, int n)


class _BatchRead:
    """Registers read together at an exit, in one ``uc_reg_read_batch`` (what the handler is
    about to use: one C call instead of one per register)."""

    __slots__ = ("names", "_vals", "_args", "_keep")

    def __init__(self, names: tuple[str, ...]):
        n = len(names)
        self.names = names
        ids = (ctypes.c_int * n)(*(_UC_BY_NAME[name] for name in names))
        self._vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self._vals)
        ptrs = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))
        self._keep = (ids, ptrs)
        self._args = (ctypes.c_void_p(ctypes.addressof(ids)),
                      ctypes.c_void_p(ctypes.addressof(ptrs)), n)

    def exit_registers(self, uch, read) -> "ExitRegisters":
        """The exit's register file with these registers read (``read``: the CPU's one
        register read, for the others). ``uch``: a live engine's handle."""
        err = _uc_reg_read_batch(uch, *self._args)
        if err:  # pragma: no cover
            raise UcError(err)
        loaded = dict(zip(self.names, self._vals[:]))  # (a slice: the array's fast path)
        regs = dict.__new__(ExitRegisters)  # (what ExitRegisters(read) sets, and these read)
        dict.update(regs, loaded)
        regs._read, regs.loaded, regs.more = read, loaded, _NO_MORE
        return regs


def _no_more(name: str) -> int:  # pragma: no cover - never called: no names
    raise KeyError(name)


_NO_MORE: tuple[frozenset[str], Callable[[str], int]] = (frozenset(), _no_more)


class ExitRegisters(dict):
    """The register file a VM exit hands to the hypervisor model (:class:`ExitHandler`): the
    GPRs, ``rip`` and ``rflags`` by name, each read from unicorn when first used rather than
    all of them at every exit (a doorbell's handler reads two or three).

    It behaves as a complete dict of those 18 registers: a look-up, ``get``, ``in`` and every
    view or copy read what has not been read yet. ``loaded`` keeps the value each register
    had at the exit, so that :meth:`changes` names what the handler wrote
    (:meth:`GuestCpu._write_back` writes only those back).
    """

    __slots__ = ("_read", "loaded", "more")
    lazy_registers = True  # (KvmVcpu uses it as its register file, see KvmVcpu._run_handler)

    def __init__(self, read) -> None:
        """``read(unicorn register id) -> int``. (:meth:`_BatchRead.exit_registers` makes one
        with some registers read already.)"""
        self.loaded: dict[str, int] = {}
        self._read = read
        # further keys the hypervisor model reads here (its control registers and CPL):
        # (their names, provide(name)), read when first used and never written back
        self.more: tuple[frozenset[str], Callable[[str], int]] = _NO_MORE

    def __missing__(self, name: str) -> int:
        uc_id = _UC_BY_NAME.get(name)
        if uc_id is None:
            names, provide = self.more
            if name not in names:
                raise KeyError(name)
            value = provide(name)
            dict.__setitem__(self, name, value)
            return value
        value = self._read(uc_id)
        self.loaded[name] = value
        dict.__setitem__(self, name, value)
        return value

    def load_all(self) -> "ExitRegisters":
        for name in (*_REG_NAMES, *self.more[0]):
            if not dict.__contains__(self, name):
                self.__missing__(name)
        return self

    def get(self, name: str, default=None):  # type: ignore[override]
        if name in _UC_BY_NAME or name in self.more[0]:
            return self[name]
        return dict.get(self, name, default)

    def __contains__(self, name: object) -> bool:
        return (name in _UC_BY_NAME or name in self.more[0]
                or dict.__contains__(self, name))

    def __iter__(self):
        return dict.__iter__(self.load_all())

    def __len__(self) -> int:
        return dict.__len__(self.load_all())

    def keys(self):  # type: ignore[override]
        return dict.keys(self.load_all())

    def values(self):  # type: ignore[override]
        return dict.values(self.load_all())

    def items(self):  # type: ignore[override]
        return dict.items(self.load_all())

    def copy(self) -> dict[str, int]:  # type: ignore[override]
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        return dict.__eq__(self.load_all(), other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExitRegisters({dict.__repr__(self.load_all())})"

    def moved_only(self, name: str, value: int) -> bool:
        """Whether the handler's only change is ``name``, now ``value`` (:meth:`changes` is
        ``{name: value}``)."""
        if dict.get(self, name) != value or self.loaded.get(name) == value:
            return False
        loaded = self.loaded
        for k, v in dict.items(self):
            if k != name and loaded.get(k, _UNDECODED) != v and k in _UC_BY_NAME:
                return False
        return True

    def changes(self) -> dict[str, int]:
        """The registers whose value differs from the exit's (or that were only written);
        other keys a handler keeps here (the control registers KVM's model adds) are not
        registers of this file."""
        loaded = self.loaded
        return {k: v for k, v in dict.items(self)
                if loaded.get(k, _UNDECODED) != v and k in _UC_BY_NAME}


class ExitHandler(Protocol):
    """The hypervisor model as the CPU sees it (implemented by :mod:`fastmmio.sim.kvm`).

    Each method receives the exit information and the register file (a dict of GPRs, ``rip``
    and ``rflags`` read from the CPU at the exit) and returns whether the guest may go on
    (True) or KVM_RUN returns to the VMM for good (False: the CPU stops). Register changes the
    handler makes are written back before re-entry.
    """

    def io_exit(self, info: ExitInfo, regs: dict[str, int], port: int, size: int,
                is_in: bool, value: int) -> bool: ...

    def cpuid_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool: ...

    def ept_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool: ...

    def vmcall_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool: ...


class _Deadline:
    """The watchdog of :meth:`GuestCpu.run`: stops unicorn once ``seconds`` have passed, for
    the whole run rather than per ``emu_start``, from the engine's one
    :class:`~fastmmio.deadline.DeadlineTimer` thread (started once per engine, not per run).

    (``emu_start``'s own timeout starts a polling thread and joins it on every call, i.e. on
    every VM exit that stops unicorn: that cost more than the exit itself.) ``uc_emu_stop`` is
    what unicorn's own timeout thread calls, so it may come from another thread; one that lands
    between two ``emu_start`` calls is lost, so it is repeated every 10 ms until the run loop
    notices.
    """

    def __init__(self, uc: Uc, timer: DeadlineTimer, seconds: float):
        self.uc = uc
        self.fired = False
        self._timer = timer
        timer.arm(seconds, self._fire)

    def _fire(self) -> None:  # on the timer thread, holding its (re-entrant) lock
        self.fired = True
        self.uc.emu_stop()
        self._timer.arm(0.01, self._fire)

    def finish(self) -> None:
        self._timer.disarm()


class CpuEngine:
    """What a :class:`GuestCpu` keeps between guests of the same machine shape: the unicorn
    engine (virtual-TLB mode, the scratch page, the exit list), the host pages mapped into it
    (``mapped``: pfn -> ctypes view keeping the buffer exported), the CPU state it started
    with, and the watchdog's timer thread.

    :meth:`reset` makes a used engine equivalent to a new one for the next guest: the CPU
    state is restored from the context saved at creation (``uc_context_restore``: registers,
    segment and control state, flags), unicorn's translated code is dropped (the next guest's
    code sits at the same addresses; its bytes are written behind unicorn's back) and so is
    its TLB. The mappings stay; the caller rewrites the memory behind them.
    """

    def __init__(self, native_sink: bool | None = None) -> None:
        """``native_sink``: the doorbell sink's callback in C (:mod:`fastmmio.sim._hooks`);
        None: when that module is built. False: the Python callback (the reference)."""
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self.mapped: dict[int, object] = {}
        self._scratch = (ctypes.c_char * PAGE_SIZE)()
        self.uc.mem_map_ptr(_SCRATCH_HPA, PAGE_SIZE, UC_PROT_READ | UC_PROT_EXEC,
                            ctypes.addressof(self._scratch))
        self._uch = ctypes.c_void_p(self.uc._uch.value)  # (see _raw_entry)
        self.uc.ctl_exits_enabled(True)  # with no exit points: see _END
        self.uc.ctl_set_exits([])
        # the doorbell sink of exits handled without stopping (GuestCpu._fast_ept_exit): a
        # store the hypervisor skipped lands here, and landing drops unicorn's TLB (the VM
        # entry's flush, which could not be made before the store had its translation)
        if _uclib is None:  # pragma: no cover
            self.uc.mmio_map(_SINK_HPA, PAGE_SIZE, self._sink_read, None,
                             lambda uc, *_: uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE), None)
        else:  # C callbacks straight from unicorn (kept as long as the engine)
            if native_sink is None:
                native_sink = _hooks is not None
            if native_sink and _hooks is None:
                raise RuntimeError("the native doorbell sink needs fastmmio.sim._hooks, "
                                   "which is not built (no C compiler at install time)")
            self.native_sink = native_sink
            if native_sink:  # uc_ctl(uc, flush) from C, given uc_ctl and the control word
                self._sink_data = _SinkData(ctypes.cast(_uclib.uc_ctl, ctypes.c_void_p).value,
                                            _CTL_TLB_FLUSH_W)
                self._sink_callbacks = (_hooks.SINK_READ, _hooks.SINK_WRITE)
                user = ctypes.c_void_p(ctypes.addressof(self._sink_data))
            else:
                self._sink_callbacks = (_MMIO_READ(self._sink_read),
                                        _MMIO_WRITE(self._sink_write))
                user = None
            err = _uclib.uc_mmio_map(self.uc._uch, _SINK_HPA, PAGE_SIZE,
                                     self._sink_callbacks[0], None, self._sink_callbacks[1], user)
            if err:  # pragma: no cover
                raise UcError(err)
        self._pristine = self.uc.context_save()
        self.timer = DeadlineTimer("fastmmio-sim-watchdog")
        # an engine dropped without close() (a pool nobody closed) still ends its thread
        self._stop_timer = weakref.finalize(self, self.timer.close)

    def _sink_write(self, _uc, _offset: int, _size: int, _value: int, _user) -> None:
        _uc_ctl(self._uch, _CTL_TLB_FLUSH_W)  # (cannot fail: a control without arguments)

    @staticmethod
    def _sink_read(_uc, _offset: int, _size: int, _user) -> int:  # pragma: no cover
        return 0  # only stores are sent to the sink

    def reset(self) -> None:
        self.uc.context_restore(self._pristine)
        self.uc.ctl_flush_tb()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def close(self) -> None:
        """Close the unicorn engine now (``uc_close``) rather than when the garbage collector
        finds the cycle between the engine and its hooks; then drop the page views and stop
        the timer thread. Idempotent."""
        uc = self.__dict__.pop("uc", None)
        if uc is None:
            return
        self._stop_timer()
        finalizer = getattr(uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()  # runs Uc.release_handle(uch) once; the finalizer is then dead
        self.mapped.clear()


@dataclass
class CpuStop:
    """Why :meth:`GuestCpu.run` returned."""

    kind: str  # "handler" (the handler stopped it), "shutdown", "hlt", "budget", "host-error"
    rip: int
    detail: str = ""


class GuestCpu:
    """One vCPU: unicorn for instructions, :class:`Processor` for translations."""

    def __init__(self, memory: HostMemory, processor: Processor, boot: BootState,
                 handler: ExitHandler, *, fill_instruction_length: bool = True,
                 engine: CpuEngine | None = None, fast_exits: bool = False):
        self.memory = memory
        self.processor = processor
        self.handler = handler
        self.fill_instruction_length = fill_instruction_length
        self.events: Counter[str] = processor.events  # one counter for the whole machine
        if engine is None:
            engine = CpuEngine()
        else:
            engine.reset()
        self.engine = engine
        self.uc = engine.uc
        self._mapped = engine.mapped
        self._pending_fault: Fault | None = None
        self._pending_access = READ  # the access type of the refused fill
        self._insns: dict[int, Instruction | None] = {}  # decoded guest instructions by RIP
        self._operands: dict[int, tuple | None] = {}  # their memory operands, by RIP
        self._stores: dict[int, tuple | None] = {}  # see _plain_store, by RIP
        self._pending_exception: str | None = None
        self._lengths: dict[int, int] = {}
        self._io_infos: dict[tuple, ExitInfo] = {}  # I/O-instruction exits, see _io
        self._stop: CpuStop | None = None
        self._hook_error: BaseException | None = None
        self.reusable = True  # False while run() is under way or after it raised
        self.fast_exits = fast_exits
        self._block_ips: dict[tuple[int, int], tuple[int, ...]] | None = None  # count_instructions
        self._native_hooks: list[int] = []
        self._native_callbacks: list = []  # the C function pointers of those hooks
        self._code: tuple[int, bytes] = (0, b"")
        self._block: tuple[int, ...] = ()  # the addresses of the block unicorn is running
        self._refused_fetch = False  # the last refused fill was an instruction fetch
        self._fetch_memo: tuple[int, int] | None = None  # (page, HPA) see _fast_ept_exit
        self._pending_outcome: tuple | None = None  # an EPT exit handled in the fill hook
        self._hooks = [
            self.uc.hook_add(UC_HOOK_INSN, self._hook_cpuid, None, 1, 0, X.UC_X86_INS_CPUID),
            self.uc.hook_add(UC_HOOK_INTR, self._hook_intr),
        ]
        # the hooks of every exit: C callbacks straight into these methods
        if _uclib is None:  # pragma: no cover
            self._hooks += [
                self.uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill_entry),
                self.uc.hook_add(UC_HOOK_INSN, self._hook_out, None, 1, 0, X.UC_X86_INS_OUT),
                self.uc.hook_add(UC_HOOK_INSN, self._hook_in, None, 1, 0, X.UC_X86_INS_IN)]
        else:
            self._add_native_hook(UC_HOOK_TLB_FILL, _HOOK_TLB_FILL(self._tlb_fill))
            self._add_native_hook(UC_HOOK_INSN, _HOOK_OUT(self._hook_out), 1, 0,
                                  X.UC_X86_INS_OUT)
            self._add_native_hook(UC_HOOK_INSN, _HOOK_IN(self._hook_in), 1, 0,
                                  X.UC_X86_INS_IN)
        # no combined TLB (caches "none"): every access walks, instruction fetches included
        self.walk_every_access = not processor.config.combined_tlb
        self._fetch_filled: int | None = None  # page of unicorn's last counted fetch fill
        if self.walk_every_access:
            self._hooks.append(self.uc.hook_add(UC_HOOK_CODE, self._hook_fetch))
        # read together: RIP and RAX at an I/O-instruction exit (the skip and the OUT's
        # value); RIP and the address registers of the last store handled in the fill hook
        # (a doorbell loop's stores come from one instruction; any register read at the exit
        # reads its value at the exit, so a guess that misses costs nothing but the read)
        # (x86-64 GPRs, RIP and RFLAGS are all 64-bit values in unicorn)
        self._io_read = _BatchRead(("rip", "rax"))
        self._store_read = _BatchRead(("rip",))
        self._batch_reads: dict[tuple[str, ...], _BatchRead] = {}  # by register names
        self._all_read = _BatchRead(_REG_NAMES)  # (regs)
        self._one = ctypes.c_uint64()  # uc_reg_read / uc_reg_write's value
        self._one_addr = ctypes.c_void_p(ctypes.addressof(self._one))
        self._uch = engine._uch if _uclib is not None else None  # None once detached or closed
        self.set_regs({"rip": boot.rip, "rsp": boot.rsp, "rflags": boot.rflags, **boot.gprs})

    def hook_code(self, callback, begin: int, end: int) -> int:
        """A ``UC_HOOK_CODE`` hook over ``[begin, end]`` that belongs to this guest: removed by
        :meth:`detach` before the engine serves another one."""
        h = self.uc.hook_add(UC_HOOK_CODE, callback, None, begin, end)
        self._hooks.append(h)
        return h

    def count_instructions(self, code_gpa: int, code: bytes) -> None:
        """Count ``guest.insn`` for the instructions of ``code`` (at linear = guest-physical
        ``code_gpa``; guest code here is never rewritten) per translated block instead of per
        instruction: one ``UC_HOOK_BLOCK`` callback adds the block's instruction count, and
        where unicorn leaves a block early the instructions it did not run are taken off again
        (:meth:`_uncount_rest`). The result is what a per-instruction ``UC_HOOK_CODE`` count
        gives (its hook fires before each instruction, not after a stop request), one Python
        callback per block instead of one per instruction."""
        self._block_ips = {}
        self._code = (code_gpa, code)
        end = code_gpa + len(code) - 1
        if _uclib is None:  # pragma: no cover
            self._hooks.append(self.uc.hook_add(UC_HOOK_BLOCK, self._on_block, None,
                                                code_gpa, end))
        else:
            self._add_native_hook(UC_HOOK_BLOCK, _HOOK_CODE(self._on_block), code_gpa, end)
            # A code hook over the same range that calls no Python: with any code hook on an
            # instruction unicorn checks for a stop request before running it, so a stop
            # requested by a hook (the done port's OUT) takes effect at the next instruction
            # as with a per-instruction count, not at the end of the block. The callback is a
            # C function of unicorn's that reads one integer argument and changes nothing
            # (uc_arch_supported; on x86-64 and AArch64 the extra arguments are ignored).
            self._add_native_hook(UC_HOOK_CODE, _NATIVE_NOOP, code_gpa, end)

    def _add_native_hook(self, kind: int, callback, begin: int = 1, end: int = 0,
                         *extra: int) -> None:
        """``uc_hook_add`` with ``callback`` (a C function pointer: a ctypes prototype over a
        method of this CPU, or one of unicorn's own functions) straight from unicorn, without
        the binding's per-call wrapper frames; removed by :meth:`detach`. The prototype is
        kept as long as the hook."""
        h = ctypes.c_size_t()
        err = _uclib.uc_hook_add(self.uc._uch, ctypes.byref(h), kind, callback, None,
                                 ctypes.c_uint64(begin), ctypes.c_uint64(end), *extra)
        if err:  # pragma: no cover
            raise UcError(err)
        self._native_hooks.append(h.value)
        self._native_callbacks.append(callback)

    def _on_block(self, _uc, address: int, size: int, _user) -> None:
        try:
            key = (address, size)
            ips = self._block_ips.get(key)
            if ips is None:
                base, code = self._code
                end = min(address + size, base + len(code))
                ips = tuple(i.ip for i in Decoder(64, code[address - base:end - base], ip=address))
                self._block_ips[key] = ips
            self._block = ips
            self.events["guest.insn"] += len(ips)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run()
            self._hook_error = exc
            self.uc.emu_stop()

    def _code_size_at(self, address: int) -> int:
        """The length of the instruction at ``address`` from the code given to
        :meth:`count_instructions` (1 when it is not there). With a block hook installed,
        unicorn 2.1 hands the code hook of an instruction it cannot decode (a VMCALL) the
        block hook's unpatched size placeholder (0xF1F1F1F1-like) instead of a length."""
        base, code = self._code
        if base <= address < base + len(code):
            n = Decoder(64, code[address - base:address - base + 15], ip=address).decode().len
            return n or 1
        return 1

    def insns_after(self, address: int) -> int:
        """How many instructions of the running block come after ``address`` (counted by
        :meth:`count_instructions` at the block's start, not run yet)."""
        ips = self._block
        return len(ips) - ips.index(address) - 1 if address in ips else 0

    def _uncount_rest(self, rip: int, stop_requested: bool = False) -> None:
        """unicorn left the block at ``rip`` (which ran, or faulted after its count). After a
        stop requested by a hook (``uc_emu_stop``) unicorn still calls the first code hook
        of the next instruction before it stops (unicorn 2.1), so a per-instruction count
        includes that instruction although it does not run: so does this one, unless the
        first code hook is the caches-``none`` fetch hook (added before the count's)."""
        if self._block_ips is not None:
            n = self.insns_after(rip)
            if stop_requested and n and not self.walk_every_access:
                n -= 1
            if n:
                self.events["guest.insn"] -= n
            self._block = ()

    def detach(self) -> CpuEngine:
        """Take the engine away from this CPU for another guest (:class:`CpuEngine`): this
        CPU's hooks are removed and it no longer has an engine (``uc``)."""
        uc = self.__dict__.pop("uc")
        self._uch = None  # (registers are no longer this CPU's: see reg)
        for h in self._hooks:
            uc.hook_del(h)
        for h in self._native_hooks:
            err = _uclib.uc_hook_del(uc._uch, h)
            if err:  # pragma: no cover
                raise UcError(err)
        self._hooks = []
        self._native_hooks = []
        self._native_callbacks = []
        return self.engine

    # -- memory --------------------------------------------------------------------------------

    def map_host_range(self, hpa: int, size: int) -> None:
        """Map the backed host pages of ``[hpa, hpa+size)`` into unicorn's physical space: one
        ``mem_map_ptr`` per run of pages that are adjacent in the host process as well
        (:meth:`HostMemory.back` gives a multi-page backing one buffer). unicorn's cost per
        mapped region is high, at mapping and at ``uc_close`` alike."""
        run: list[tuple[int, object]] = []  # (pfn, view) of pages adjacent in the host too

        def flush() -> None:
            if run:
                pfn0, view0 = run[0]
                self.uc.mem_map_ptr(pfn0 << 12, PAGE_SIZE * len(run),
                                    UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC,
                                    ctypes.addressof(view0))
                self._mapped.update(run)
                run.clear()

        for pfn in range(hpa >> 12, (hpa + size + PAGE_SIZE - 1) >> 12):
            if pfn in self._mapped:
                flush()
                continue
            view = (ctypes.c_char * PAGE_SIZE).from_buffer(self.memory.page(pfn << 12))
            if run and (run[-1][0] + 1 != pfn
                        or ctypes.addressof(run[-1][1]) + PAGE_SIZE != ctypes.addressof(view)):
                flush()
            run.append((pfn, view))
        flush()

    # -- registers -----------------------------------------------------------------------------

    def regs(self) -> dict[str, int]:
        """The GPRs, RIP and RFLAGS by name (one ``uc_reg_read_batch``)."""
        if _uclib is None:  # pragma: no cover
            return dict(zip(_REG_NAMES, self.uc.reg_read_batch(_UC_REGS)))
        self._live_handle()
        return dict(self._all_read.exit_registers(self._uch, self.reg).loaded)

    def _exit_regs(self) -> ExitRegisters:
        """The register file for a handler: read from unicorn as the handler uses it; what it
        changes is written back by :meth:`_write_back`."""
        return ExitRegisters(self.reg)

    def reg(self, reg_id: int) -> int:
        """One 64-bit register (a unicorn ``UC_X86_REG_*`` id)."""
        if _uclib is None:  # pragma: no cover
            return self.uc.reg_read(reg_id)
        err = _uc_reg_read(self._live_handle(), reg_id, self._one_addr)
        if err:
            raise UcError(err)
        return self._one.value

    def set_regs(self, regs: dict[str, int]) -> None:
        for name, value in regs.items():
            if _uclib is None:  # pragma: no cover
                self.uc.reg_write(_UC_BY_NAME[name], value)
                continue
            self._one.value = value & 0xFFFF_FFFF_FFFF_FFFF
            err = _uc_reg_write(self._live_handle(), _UC_BY_NAME[name], self._one_addr)
            if err:
                raise UcError(err)

    def _live_handle(self):
        """The engine's handle for unicorn's C calls; never that of a closed engine (unicorn
        would crash) or of one serving another guest."""
        if self._uch is None:
            raise RuntimeError("this vCPU's engine is closed or serves another guest: "
                               "its registers are gone")
        return self._uch

    def _write_back(self, regs: ExitRegisters) -> None:
        """Write the registers the handler changed."""
        changed = regs.changes()
        if changed:
            self.set_regs(changed)

    # -- the run loop --------------------------------------------------------------------------

    def flush_tlb(self) -> None:
        """Drop unicorn's own TLB so the next access to every page asks the model again."""
        self._fetch_memo = None
        if _uclib is None:  # pragma: no cover
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            return
        err = _uc_ctl(self._uch, _CTL_TLB_FLUSH_W)
        if err:
            raise UcError(err)

    def _emu_start(self, rip: int, count: int) -> None:
        """``emu_start`` without the binding's wrapper (this class's hooks keep their own
        exceptions, see :meth:`_run`)."""
        if _uclib is None:  # pragma: no cover
            self.uc.emu_start(rip, _END, 0, count)
            return
        err = _uclib.uc_emu_start(self.uc._uch, rip, _END, 0, count)
        if err:
            raise UcError(err)

    def _vmentry(self) -> None:
        self.processor.vmentry()
        self.flush_tlb()

    def run(self, insn_budget: int = 0, timeout_us: int = 0) -> CpuStop:
        """Run the guest until the handler stops it, the guest shuts down or halts, or the
        budget (instructions, or microseconds of host time) runs out: the simulator's watchdog.
        """
        self._stop = None
        self.reusable = False
        deadline = (_Deadline(self.uc, self.engine.timer, timeout_us / 1e6)
                    if timeout_us > 0 else None)
        try:
            stop = self._run(insn_budget, deadline)
        finally:
            if deadline is not None:
                deadline.finish()
        self.reusable = True
        return stop

    def _run(self, insn_budget: int, deadline: _Deadline | None) -> CpuStop:
        while self._stop is None:
            if deadline is not None and deadline.fired:
                return self._set_stop("budget", "instruction or time budget exhausted")
            rip = self.reg(_UC_RIP)
            self._pending_fault = None
            self._pending_exception = None
            self._refused_fetch = False
            error: UcError | None = None
            marked = _interrupts.push_engine(self.uc)
            try:
                self._emu_start(rip, insn_budget)
            except UcError as exc:
                error = exc
            finally:
                if marked:
                    _interrupts.pop_engine()
            # A Ctrl-C or SIGTERM that came while unicorn ran stopped it (the handler does not
            # raise inside a hook, see fastmmio.interrupts): raised here, outside callbacks.
            _interrupts.check()
            if error is not None:
                if self._hook_error is not None:
                    err, self._hook_error = self._hook_error, None
                    raise err
                if not self._refused_fetch:  # a data access faulted: the rest did not run
                    self._uncount_rest(self.reg(_UC_RIP))
                if self._pending_outcome is not None:
                    self._finish_ept_exit(*self._pending_outcome)
                    self._pending_outcome = None
                    continue
                if self._pending_fault is not None:
                    self._ept_exit(self._pending_fault)
                    continue
                if self._pending_exception is not None:
                    return self._set_stop("shutdown", self._pending_exception)
                if error.errno == UC_ERR_INSN_INVALID and self._vmcall_exit():
                    continue
                return self._set_stop("shutdown", f"unicorn: {error}")
            if self._hook_error is not None:
                err, self._hook_error = self._hook_error, None
                raise err
            if self._stop is not None:
                break
            if self._pending_exception is not None:
                self._uncount_rest(self.reg(_UC_RIP))
                return self._set_stop("shutdown", self._pending_exception)
            # emu_start returned by itself: budget or timeout exhausted, or HLT.
            new_rip = self.reg(_UC_RIP)
            if (deadline is None or not deadline.fired) and self._last_insn_is_hlt(new_rip):
                return self._set_stop("hlt", "HLT with no interrupt to wake the vCPU")
            return self._set_stop("budget", "instruction or time budget exhausted")
        return self._stop

    def _set_stop(self, kind: str, detail: str) -> CpuStop:
        self._stop = CpuStop(kind, self.reg(_UC_RIP), detail)
        return self._stop

    def _last_insn_is_hlt(self, rip: int) -> bool:
        with self.processor.uncounted():
            hpa = self.processor.translate(rip - 1, FETCH)
        return isinstance(hpa, int) and self.memory.read(hpa, 1) == 0xF4

    def _ept_exit(self, fault: Fault) -> None:
        regs = self._exit_regs()
        info, go_on = self._handle_ept_exit(fault, regs)
        self._finish_ept_exit(info, go_on, regs)

    def _handle_ept_exit(self, fault: Fault, regs: dict[str, int], exact: object = _UNDECODED,
                         length: int | None = None) -> tuple[ExitInfo, bool]:
        """(``exact``: the access's address, ``length``: the instruction's, when the caller
        knows them already.)"""
        self._fetch_memo = None
        if not self.fill_instruction_length:
            length = None
        elif length is None:
            length = self._insn_length(regs["rip"])
        if fault.linear != exact:
            fault = self._exact_fault(fault, regs, exact)
        info = self.processor.exit_info(fault, length)
        self.processor.vmexit(info)
        return info, self.handler.ept_exit(info, regs)

    def _finish_ept_exit(self, info: ExitInfo, go_on: bool, regs: ExitRegisters) -> None:
        self._write_back(regs)
        if not go_on:
            self.flush_tlb()  # (unicorn does not run in between: one flush serves exit and entry)
            self._set_stop("handler", info.name)
            return
        self._vmentry()

    def _vmcall_exit(self) -> bool:
        """The VM exit of a VMCALL unicorn refused (SDM 25.1.2); False when the invalid
        instruction at RIP is not a VMCALL (then it is the guest's #UD)."""
        regs = self._exit_regs()
        insn = self._decode_at(regs["rip"])
        if insn is None or insn.code != Code.VMCALL:
            return False
        info = ExitInfo(EXIT_VMCALL, instruction_length=insn.len)
        self.processor.vmexit(info)
        go_on = self.handler.vmcall_exit(info, regs)
        self._write_back(regs)
        if not go_on:
            self.flush_tlb()
            self._set_stop("handler", info.name)
            return True
        self._vmentry()
        return True

    def _fast_ept_exit(self, fault: Fault, page: int, entry) -> bool | None:
        """An EPT exit met by a store, handled inside the TLB-fill hook without stopping
        unicorn when the hypervisor's answer is a skip (``KVM_FAST_MMIO_BUS`` hit: RIP moves
        past the instruction, nothing else changes). Returns True when the fill is answered
        (the store goes to the sink and the guest runs on), False when the exit was handled
        but needs the stop (its outcome is applied by :meth:`_run` as :meth:`_ept_exit`
        would), None when it is not tried (the reference path takes it).

        The same steps as the reference path (stop, :meth:`_ept_exit`, restart), in the same
        order: exit information, VM exit, handler, VM entry, then the translation of the next
        instruction's page that unicorn asks for first after a restart (done here, and its
        answer kept for unicorn's own ask of that page if it comes before the next exit: after
        a restart it asks once and keeps the answer in its TLB). The entry's flush of
        unicorn's TLB happens when the store lands in the sink (:class:`CpuEngine`), before
        any other access. Tried only for a plain ``MOV`` store within one page: the skip then
        differs from letting the store complete into the sink in nothing the guest sees.
        RIP is exact in the hook because the session's code hook makes unicorn keep it per
        instruction (SimSession passes ``fast_exits``)."""
        if _uclib is None:  # pragma: no cover
            regs = self._exit_regs()
        else:
            regs = self._store_read.exit_registers(self._uch, self.reg)
        rip = regs["rip"]
        store = self._stores.get(rip, _UNDECODED)
        if store is _UNDECODED:
            store = self._stores[rip] = self._plain_store(rip)
        if store is None:
            return None
        length, size, self._store_read = store
        la = self._exact_address(page, regs)
        if la is None or (la & 0xFFF) + size > PAGE_SIZE:
            return None
        self._pending_access = WRITE
        info, go_on = self._handle_ept_exit(fault, regs, la if fault.linear == page else _UNDECODED,
                                            length)
        next_rip = rip + length
        if not go_on or not regs.moved_only("rip", next_rip):
            self._pending_outcome = (info, go_on, regs)
            return False
        self.processor.vmentry()
        if not self.walk_every_access:  # (otherwise _hook_fetch translates it, as after a restart)
            hpa = self.processor.translate(next_rip, FETCH)
            self._fetch_memo = (next_rip >> 12, hpa)
        entry.paddr = _SINK_HPA
        entry.perms = UC_PROT_READ | UC_PROT_WRITE
        return True

    def _plain_store(self, rip: int) -> tuple[int, int, _BatchRead] | None:
        """(instruction length, access size, the batch read of RIP and the registers its
        address needs) of the instruction at ``rip`` when it is a plain ``MOV`` store (the
        stores :meth:`_fast_ept_exit` handles), else None."""
        insn = self._decode_at(rip)
        if insn is None or insn.mnemonic != Mnemonic.MOV or insn.op0_kind != OpKind.MEMORY:
            return None
        op = self._operands.get(rip, _UNDECODED)
        if op is _UNDECODED:
            op = self._operands[rip] = self._memory_operand(rip)
        if op is None:
            return None
        names = ("rip",) + tuple(dict.fromkeys(r for r in op[2:4] if r is not None))
        batch = self._batch_reads.get(names)
        if batch is None:
            batch = self._batch_reads[names] = _BatchRead(names)
        return insn.len, op[-1], batch

    def _insn_length(self, rip: int) -> int | None:
        """The VM-exit instruction length the processor writes. It comes from the processor's
        own decode, not from a memory reference, so the look-up made here to read the bytes
        is not counted (the counter is restored); lengths are kept per RIP (guest code here
        is never rewritten)."""
        n = self._lengths.get(rip)
        if n is not None:
            return n
        insn = self._decode_at(rip)
        n = insn.len if insn is not None else None
        if n:
            self._lengths[rip] = n
        return n or None

    def _decode_at(self, rip: int) -> Instruction | None:
        """The guest instruction at ``rip``, decoded as the processor does it: the look-up
        made to read its bytes is not a counted memory reference; kept per RIP (guest code
        here is never rewritten)."""
        if rip in self._insns:
            return self._insns[rip]
        with self.processor.uncounted():
            hpa = self.processor.translate(rip, FETCH)
        if not isinstance(hpa, int):
            return None
        code = self.memory.read_bytes(hpa, min(15, PAGE_SIZE - (hpa & 0xFFF)))
        insn = Decoder(64, code, ip=rip).decode()
        self._insns[rip] = insn = insn if insn.len else None
        return insn

    def _exact_fault(self, fault: Fault, regs: dict[str, int],
                     exact: object = _UNDECODED) -> Fault:
        """The fault with the access's own linear and guest-physical address.

        unicorn's TLB-fill hook is given the *page* of an access, not its address (unicorn
        2.1: an access to 0x401014 asks for 0x401000), so the processor model translated the
        page base. An EPT violation or misconfiguration reports the exact GPA, and the exact
        GLA when it has one (SDM 27.2.1, "guest-physical address" and "guest linear address"
        fields): KVM matches that GPA on ``KVM_FAST_MMIO_BUS`` (handle_ept_misconfig) and
        hands it to the MMU and the emulator. The offset is recovered from the instruction at
        RIP (SDM Vol. 1 3.7.5: base + index * scale + displacement, 32-bit with the
        address-size prefix; RIP-relative from the next instruction), or RIP itself for a
        fetch. For an EPT violation only an access to the final translation (qualification
        bit 8) takes the offset into its GPA; a misconfiguration does not say, so its GPA
        comes from translating the exact address again (a misconfiguration invalidates
        nothing, SDM 28.3.3.1, and it is not counted: it is the same reference). Found
        by differential fuzzing (fastmmio.fuzz.differential): a read of 0x401014 hit the
        length-0 ioeventfd at 0x401000 on KVM_FAST_MMIO_BUS.
        (``exact``: the access's address when the caller has worked it out already.)"""
        page = fault.linear
        if page is None or page & 0xFFF:
            return fault
        if exact is _UNDECODED:
            exact = self._exact_address(page, regs)
        if exact is None or exact == page:
            return fault
        if fault.kind == "ept_violation":
            gpa = fault.gpa
            if gpa is not None and fault.qualification & QUAL_TRANSLATED:
                gpa = (gpa & ~0xFFF) | (exact & 0xFFF)
            return Fault(fault.kind, exact, gpa, fault.error_code, fault.qualification,
                         fault.structure, fault.level)
        if fault.kind in ("ept_misconfig", "npf"):  # (an SVM #NPF: EXITINFO2, APM 15.25.6)
            with self.processor.uncounted():
                again = self.processor.translate(exact, self._pending_access)
            if isinstance(again, Fault) and again.kind == fault.kind:
                return again
        return fault

    def _exact_address(self, page: int, regs: dict[str, int]) -> int | None:
        """The linear address in ``page`` the instruction at RIP accesses (its memory
        operand, or its own bytes for a fetch), or None when it cannot be told."""
        rip = regs["rip"]
        if self._pending_access == FETCH:
            return rip if rip >> 12 == page >> 12 else page
        op = self._operands.get(rip, _UNDECODED)
        if op is _UNDECODED:
            op = self._operands[rip] = self._memory_operand(rip)
        if op is None:
            return None
        ip_rel, displ, base, index, scale, mask, seg, size = op
        if ip_rel is not None:
            la = ip_rel
        else:
            la = displ
            if base is not None:
                la += regs[base]
            if index is not None:
                la += regs[index] * scale
            la &= mask
        if seg is not None:
            la += self.reg(seg)
        la &= 0xFFFF_FFFF_FFFF_FFFF
        if la >> 12 == page >> 12:
            return la
        if la < page < la + size:  # an access starting on the page before: its part here
            return page
        return None

    def _memory_operand(self, rip: int) -> tuple | None:
        """The memory operand of the instruction at ``rip`` as a tuple the exit path can
        evaluate without iced-x86: (RIP-relative address or None, displacement, base GPR name,
        index GPR name, scale, address-size mask, FS/GS base register id, access size)."""
        insn = self._decode_at(rip)
        if insn is None or not any(insn.op_kind(i) == OpKind.MEMORY for i in range(insn.op_count)):
            return None
        size = max(MemorySizeExt.size(insn.memory_size), 1)
        seg = {Register.FS: X.UC_X86_REG_FS_BASE,
               Register.GS: X.UC_X86_REG_GS_BASE}.get(insn.memory_segment)
        if insn.is_ip_rel_memory_operand:
            return (insn.ip_rel_memory_address, 0, None, None, 1, 0, seg, size)
        names = []
        a32 = False
        for reg in (insn.memory_base, insn.memory_index):
            if reg == Register.NONE:
                names.append(None)
                continue
            names.append(GPRS[RegisterExt.number(RegisterExt.full_register(reg))])
            a32 |= RegisterExt.size(reg) == 4
        mask = 0xFFFF_FFFF if a32 else 0xFFFF_FFFF_FFFF_FFFF
        return (None, insn.memory_displacement, names[0], names[1], insn.memory_index_scale,
                mask, seg, size)

    # -- hooks (exceptions are kept and re-raised after emu_start: unicorn would lose them) ---

    def _tlb_fill_entry(self, uc: Uc, vaddr: int, mem_type: int, entry, _user) -> bool:
        """(the binding's form of the hook, without the C library: ``entry`` a structure)"""
        return self._tlb_fill(uc, vaddr, mem_type, ctypes.addressof(entry), _user)  # pragma: no cover

    def _tlb_fill(self, _uc, vaddr: int, mem_type: int, entry_address: int, _user) -> bool:
        """``UC_HOOK_TLB_FILL``: the processor model translates ``vaddr`` (a page) for the
        access; ``entry_address`` is that of unicorn's ``uc_tlb_entry`` to fill."""
        entry = _TlbEntry.from_address(entry_address)
        if vaddr >> 12 == _END_PAGE:
            entry.paddr = _SCRATCH_HPA
            entry.perms = UC_PROT_READ | UC_PROT_EXEC
            return True
        try:
            access = _ACCESS.get(mem_type, READ)
            memo = self._fetch_memo
            if memo is not None and access == FETCH and memo[0] == vaddr >> 12:
                self._fetch_memo = None  # asked for already, after the fast exit's entry
                r = memo[1]
            else:
                r = self.processor.translate(vaddr, access)
            if isinstance(r, int):
                if not r >> 12 in self._mapped:
                    self._pending_exception = f"access to unbacked host page {r:#x}"
                    self._refused_fetch = access == FETCH
                    return False
                if access == FETCH:
                    self._fetch_filled = vaddr >> 12
                entry.paddr = r & ~0xFFF
                entry.perms = _PERMS[access]
                return True
            if r.kind in VM_EXIT_KINDS:  # (Fault.is_vm_exit, without the call)
                if self.fast_exits and access == WRITE:
                    done = self._fast_ept_exit(r, vaddr, entry)
                    if done:
                        return True
                    if done is False:
                        return False
                self._pending_fault = r
                self._pending_access = access
            else:
                self._pending_exception = f"guest {r!r} with no handler: triple fault"
            self._refused_fetch = access == FETCH
            return False
        except BaseException as exc:  # noqa: BLE001 - re-raised by run()
            self._hook_error = exc
            return False

    def _io(self, port: int, size: int, is_in: bool, value: int) -> None:
        if _uclib is None:  # pragma: no cover
            regs = self._exit_regs()
        else:
            regs = self._io_read.exit_registers(self._uch, self.reg)
        rip = regs["rip"]
        key = (rip, port, size, is_in)
        info = self._io_infos.get(key)
        if info is None:  # (ExitInfo is immutable: one per instruction and port)
            info = self._io_infos[key] = ExitInfo(
                EXIT_IO_INSTRUCTION, io_qualification(port, size, is_in),
                instruction_length=self._insn_length(rip))
        self.processor.vmexit(info)
        go_on = self.handler.io_exit(info, regs, port, size, is_in, value)
        regs["rip"] = rip  # the handler skipped the instruction; unicorn advances RIP
        self._write_back(regs)
        self._resume_or_stop(go_on, info, rip + (info.instruction_length or 0))

    def _resume_or_stop(self, go_on: bool, info: ExitInfo, next_rip: int) -> None:
        """After an exit handled inside an instruction hook. unicorn goes on in the same run
        with its translated blocks chained, so it will not ask for the code page again: the
        first instruction fetch after the VM entry is translated here (a TLB hit with VPID on;
        a new walk when the exit and entry invalidated combined mappings, 28.3.3.1)."""
        if go_on:
            self._vmentry()
            if not self.walk_every_access:  # (otherwise _hook_fetch translates it)
                self.processor.translate(next_rip, FETCH)
        else:
            self.flush_tlb()
            self._set_stop("handler", info.name)
            self.uc.emu_stop()
            self._uncount_rest(next_rip - (info.instruction_length or 0), stop_requested=True)

    def _hook_fetch(self, uc: Uc, address: int, size: int, _user) -> None:
        """Caches ``none`` only: this instruction's fetch translated by the model (unless
        unicorn's own fill just did it), then unicorn's TLB dropped so that the instruction's
        data accesses are translated by the model as well."""
        try:
            if size > 15:  # not an instruction's size: see _code_size_at
                size = self._code_size_at(address)
            filled, self._fetch_filled = self._fetch_filled, None
            pages = {address >> 12, (address + max(size, 1) - 1) >> 12}
            for page in sorted(pages):
                if page == filled:
                    continue
                r = self.processor.translate(max(address, page << 12), FETCH)
                if not isinstance(r, int):  # unicorn fetched these bytes a moment ago
                    raise RuntimeError(f"fetch at {address:#x} translated for unicorn but "
                                       f"refused when counted: {r!r}")
            self.flush_tlb()
        except BaseException as exc:  # noqa: BLE001 - re-raised by run()
            self._hook_error = exc
            uc.emu_stop()

    def _hook_out(self, _uc, port: int, size: int, value: int, _user) -> None:
        try:
            self._io(port, size, False, value)
        except BaseException as exc:  # noqa: BLE001
            self._hook_error = exc
            self.uc.emu_stop()

    def _hook_in(self, _uc, port: int, size: int, _user) -> int:
        """IN completes in unicorn with the value the handler left in RAX (KVM's
        complete_fast_pio_in writes it there before re-entry)."""
        try:
            self._io(port, size, True, 0)
            return self.reg(_UC_RAX) & ((1 << (8 * size)) - 1)
        except BaseException as exc:  # noqa: BLE001
            self._hook_error = exc
            self.uc.emu_stop()
            return 0

    def _hook_cpuid(self, uc: Uc, _user) -> int:
        try:
            regs = self._exit_regs()
            rip = regs["rip"]
            info = ExitInfo(EXIT_CPUID, instruction_length=2)
            self.processor.vmexit(info)
            go_on = self.handler.cpuid_exit(info, regs)
            # the handler skipped the instruction (rip += 2); unicorn advances RIP itself
            regs["rip"] = rip
            self._write_back(regs)
            self._resume_or_stop(go_on, info, rip + 2)
        except BaseException as exc:  # noqa: BLE001
            self._hook_error = exc
            uc.emu_stop()
        return 1  # skip unicorn's own CPUID

    def _hook_intr(self, uc: Uc, intno: int, _user) -> None:
        self._pending_exception = f"guest exception vector {intno} with no handler: triple fault"
        uc.emu_stop()

    def close(self) -> None:
        """Close the unicorn engine now (:meth:`CpuEngine.close`). Idempotent."""
        if self.__dict__.pop("uc", None) is None:
            return
        self._uch = None
        self.engine.close()
