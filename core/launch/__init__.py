"""Launching and supervising QEMU (``vmconfine.launch``).

:mod:`~vmconfine.launch.pipeline` is the start and stop sequence, read top to bottom;
:mod:`~vmconfine.launch.child` runs from fork to exec; :mod:`~vmconfine.launch.process` watches
a started QEMU; :mod:`~vmconfine.launch.supervisor` waits on a started domain (QMP events,
signals, exit); :mod:`~vmconfine.launch.journal` records every host change before it is made;
:mod:`~vmconfine.launch.runtime` holds per-domain files, locks and /proc readers;
:mod:`~vmconfine.launch.connection` is one instance with its stack, running domains and crash
recovery; :mod:`~vmconfine.launch.attach` adopts a QEMU started by hand.
"""
