"""TVM llvm targets (dict form) for edgec Targets: this machine's CPU, or an aarch64 device."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from edgec.errors import UserError

_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    return _MACHINES.get(platform.machine().lower(), platform.machine().lower())


def host_target() -> dict:
    """llvm for this machine's CPU (what -mcpu=native picks) on all its cores.

    The CPU model, not a feature list: LLVM derives the ISA extensions (AVX2, AVX-512, VNNI...) and
    the scheduling model from it, and MetaSchedule reads the vector width from it.
    """
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": host_cores()}


def host_cores() -> int:
    """Physical cores this process may run on: one thread per core, what onnxruntime runs by default."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores) or 1


def use_host_cores() -> None:
    """Gives TVM's thread pool in this process one thread per physical core, unless TVM_NUM_THREADS
    or OMP_NUM_THREADS (which TVM reads next) says otherwise.

    TVM's own default on x86 is half the logical CPUs, on the assumption that every core runs two
    hardware threads; on a host without SMT (most virtual machines) that is half the cores, and every
    kernel, tuning measurements included, ran on one of this 2-core host's cores. The pool reads the
    variable when the process first runs a parallel kernel, so this is called before that."""
    if not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["TVM_NUM_THREADS"] = str(host_cores())


def runs_here(target) -> bool:
    """Whether an artifact for `target` is built for, and runs on, this machine's CPU."""
    return target.arch == host_arch()


def llvm_target(target) -> dict:
    """The TVM target an edgec Target compiles to: the host CPU for the host's arch, an aarch64
    cross target otherwise."""
    if runs_here(target):
        return host_target()
    if target.arch == "aarch64":
        from edgec.backends.tvm.emulate import aarch64_target

        return aarch64_target(target)
    raise UserError(f"the tvm backend cannot build for {target.arch} on this {host_arch()} machine",
                    "compile on a machine of that architecture")
