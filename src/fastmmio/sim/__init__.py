"""The simulator: an Intel VMX/EPT processor model (vmx/) under a model of KVM (kvm/)."""
