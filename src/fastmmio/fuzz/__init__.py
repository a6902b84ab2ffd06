"""Reliability of the host side: hostile guests and soak runs on real KVM.

- :mod:`.program`: a fuzz :class:`~.program.Program` (guest instructions plus the machine
  around them), shared by every generator and runner (a simulator-vs-KVM differential
  runner can take the same programs);
- :mod:`.hostile`: generators of hostile guests by kind;
- :mod:`.runner`: runs programs on the real backend, classifies outcomes, checks for leaks
  and hangs;
- :mod:`.soak`: a great many notifications through every ioeventfd route;
- :mod:`.cli`: ``python -m fastmmio.fuzz hostile|soak``.
"""
