"""The daemon (``vmconfine daemon``): one process per instance that owns its domains.

:mod:`~vmconfine.daemon.store` keeps persistent definitions (``NAME.xml`` files, autostart
links); :mod:`~vmconfine.daemon.manager` starts, watches, reconnects and tears down domains
through the same launch pipeline as ``run``; :mod:`~vmconfine.daemon.events` fans lifecycle
events out to subscribers; :mod:`~vmconfine.daemon.api` is the JSON-over-HTTP API on unix
sockets, served by :mod:`~vmconfine.daemon.httpserver` (h11 and wsproto over asyncio);
:mod:`~vmconfine.daemon.main` runs it all (sockets, pid file, signals, idle exit). The
client side is :mod:`vmconfine.client` (the standard library, and wsproto for the console).
"""
