"""The KVM system handle: opening, capabilities, host-wide queries."""

from __future__ import annotations

import pytest

from squibd.kvm import Kvm, KvmUnavailable, KvmUnsupported
from squibd.kvm.system import REQUIRED_CAPABILITIES


def test_missing_device_is_a_clear_error() -> None:
    with pytest.raises(KvmUnavailable, match="cannot open /nonexistent/kvm"):
        Kvm.open("/nonexistent/kvm")


@pytest.mark.kvm
def test_capabilities_are_queried_and_required_ones_present() -> None:
    with Kvm.open() as kvm:
        assert kvm.api_version == 12
        for name in REQUIRED_CAPABILITIES:
            assert kvm.require(name) > 0
        assert kvm.max_vcpus >= kvm.recommended_vcpus >= 1
        with pytest.raises(KvmUnsupported, match="KVM_CAP_NOT_A_REAL_ONE"):
            kvm.require("KVM_CAP_NOT_A_REAL_ONE")


@pytest.mark.kvm
def test_supported_cpuid_and_msr_list_come_from_kvm() -> None:
    with Kvm.open() as kvm:
        cpuid = kvm.supported_cpuid()
        assert any(e.function == 0 for e in cpuid)
        assert any(e.function == 1 for e in cpuid)
        indices = kvm.msr_indices()
        assert len(indices) > 10
        assert 0x10 in indices  # IA32_TSC
        assert kvm.vcpu_mmap_size >= 4096
