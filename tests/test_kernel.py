"""kernel.py and the capture's kernel-feature choices, without root."""

from __future__ import annotations

import pytest

from hopwatch.capture.live import regs_args_supported
from hopwatch.doctor import check_kernel
from hopwatch.kernel import kernel_version


@pytest.mark.parametrize(
    ("release", "version"),
    [
        ("6.18.44-fc-v1300", (6, 18)),
        ("5.15.0-91-generic", (5, 15)),
        ("6.1.0-9-amd64", (6, 1)),
        ("weird", (0, 0)),
        ("", kernel_version()),  # empty: the running kernel's
    ],
)
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert kernel_version(release) == version


@pytest.mark.parametrize(
    ("release", "machine", "supported"),
    [
        ("6.18.44", "x86_64", True),
        ("5.15.0-91-generic", "x86_64", True),  # bpf_task_pt_regs
        ("5.14.21", "x86_64", False),
        ("6.1.0-9-amd64", "aarch64", False),  # another register ABI: enter programs stay
        ("6.1.0", "AMD64", True),
    ],
)
def test_regs_args_supported(release: str, machine: str, supported: bool) -> None:
    assert regs_args_supported(release, machine) is supported


def test_check_kernel_on_this_machine() -> None:
    assert check_kernel().ok is (kernel_version() >= (5, 8))
