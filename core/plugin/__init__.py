"""The plugin host (``vmconfine.plugin``): the driver contract and what runs it.

:mod:`~vmconfine.plugin.hookspecs` (the contract), :mod:`~vmconfine.plugin.registry` (plugin
manager and driver registry), :mod:`~vmconfine.plugin.stack` (the ordered drivers and their
fan-out semantics: the one public API the launch, report and CLI use),
:mod:`~vmconfine.plugin.context` (what a hook gets), :mod:`~vmconfine.plugin.resources` (the
host paths QEMU opens, with their roles) and :mod:`~vmconfine.plugin.nop` (libvirt's "none").
"""
