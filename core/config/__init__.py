"""Configuration (``vmconfine.config``): qemu.conf syntax (:mod:`~vmconfine.config.conf`), typed
settings (:mod:`~vmconfine.config.settings`), instances and URIs
(:mod:`~vmconfine.config.instance`) and a connection to one instance with its stack and
running domains (:mod:`~vmconfine.config.connection`).
"""
