"""Configuration (``vmconfine.config``): qemu.conf syntax (:mod:`~vmconfine.config.conf`), typed
settings (:mod:`~vmconfine.config.settings`) and instances and URIs
(:mod:`~vmconfine.config.instance`).
"""
