"""Tests of dmarw.vmm on real KVM (a package, so this conftest does not shadow tests/conftest.py)."""
