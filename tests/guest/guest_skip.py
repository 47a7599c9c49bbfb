"""The marks of the real-guest tests: ``kvm``, and a skip, with the reason, only where
``/dev/kvm`` is unusable or the native vCPU loop or the guest image did not build.

(A helper module with its own name rather than a conftest: several conftest modules under
tests/ shadow one another as ``conftest`` for the tests that import from it.)  The
suite-wide summary of tests/conftest.py counts these with every other ``kvm`` test.
"""

from __future__ import annotations

import pytest


def guest_unusable() -> str | None:
    """Why the real guest cannot run here, or None."""
    from dmarw.vmm import native_available
    from dmarw.vmm.system import system

    if not native_available():
        return "the native vCPU loop dmarw._vmm is not built"
    try:
        system()
    except OSError as e:
        return f"KVM unusable: {e}"
    from dmarw.guest import image_path

    if not image_path().exists():
        return f"the guest image {image_path()} is not built (gcc -m32, ld, objcopy at install)"
    return None


_WHY = guest_unusable()
MARKS = [pytest.mark.kvm, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]
