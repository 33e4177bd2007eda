"""QEMU (``vmconfine.qemu``): the command line built from the domain model
(:mod:`~vmconfine.qemu.argv`, :mod:`~vmconfine.qemu.argv_devices`), the QMP client
(:mod:`~vmconfine.qemu.qmp`), capabilities XML (:mod:`~vmconfine.qemu.capabilities`) and the
reverse conversion of a command line to domain XML (:mod:`vmconfine.qemu.fromnative`).
"""
