"""x86 architectural formats, below both the guest builder and the processor models.

:mod:`.bits` (declared bit layouts), :mod:`.paging` (IA-32e paging entries, the page-fault
error code, levels and page sizes), :mod:`.segments` (segment registers and descriptors).
Nothing here is VMX- or SVM-specific and nothing here imports another fastmmio package
except :mod:`fastmmio.errors`: ``guest/`` builds images with these formats, ``sim/vmx/``
(and a future ``sim/svm/``) walk them.
"""
