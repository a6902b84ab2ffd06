"""fastmmio: what a guest's doorbell write costs under KVM, on which path, and why."""

__version__ = "0.1.0"
