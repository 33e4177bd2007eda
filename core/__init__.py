"""vmconfine: run confined QEMU/KVM virtual machines.

libvirt's QEMU security-driver architecture (DAC, SELinux/sVirt, AppArmor, cgroup device
ACLs) rebuilt as a pluggy framework, plus Landlock, a confinement report and crash-safe
teardown.
"""

__version__ = "0.1.0"
