"""``domxml-from-native``: a QEMU command line to domain XML.

:mod:`~vmconfine.qemu.fromnative.convert` is the entry (tokenising, the option table walk, the
XML); :mod:`~vmconfine.qemu.fromnative.options` interprets each option,
:mod:`~vmconfine.qemu.fromnative.devices` the ``-device`` / ``-drive`` / ``-chardev`` families and
:mod:`~vmconfine.qemu.fromnative.model` holds the intermediate model.
"""
