"""Reports: terminal tables, kvm-unit-tests-style lines and JSON records of results."""
