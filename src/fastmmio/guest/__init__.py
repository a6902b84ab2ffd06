"""Guest images: paging structures, GDT, boot state and programs, built with iced-x86.

``build.build_image(access, cpl)`` is the entry point; :mod:`.program` holds the
kvm-unit-tests-style doorbell loop and the :class:`~.program.Access` it repeats.
"""
