"""The real-KVM backend: a ctypes binding of linux/kvm.h (:mod:`.binding`), an object layer
(:mod:`.objects`), binary statistics (:mod:`.stats`), host detection (:mod:`.host`) and the run
loop behind :class:`~fastmmio.real.backend.RealBackend` (:mod:`.runloop`, :mod:`.backend`)."""
