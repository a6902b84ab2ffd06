"""The KVM model: memslots, I/O buses and ioeventfds, the x86 emulator, the TDP MMU whose SPTEs
are the EPT the processor model walks, the exit handlers and the variants from the 2015 thread.

Names follow the kernel (arch/x86/kvm, virt/kvm); every module says which functions it models.
"""
