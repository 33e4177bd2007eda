"""The CLI's daemon verbs, virsh's names and messages: a thin client of ``vmconfine daemon``.

``define``, ``undefine``, ``start``, ``create``, ``shutdown``, ``reboot``, ``reset``,
``suspend``, ``resume``, ``domstate``, ``autostart`` and ``event`` need the instance's daemon;
``list``, ``dominfo``, ``dumpxml`` and ``destroy`` use it when it runs and work in-process
otherwise (domains started by ``run``). With no daemon running, a ``qemu:///session`` client
starts the session daemon (it exits once idle), as libvirt's does; for the system instance and
embed roots the admin starts it (``vmconfine daemon --daemon``).

This module imports only the standard library and :mod:`vmconfine.errors` at import time;
a verb imports what it needs when it runs, so a query (:data:`QUERIES`) answered by a running
daemon starts in little more than the interpreter's own start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from vmconfine.errors import VmconfineError

#: typing's own TYPE_CHECKING without importing typing (a query's start-up)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

Handler = Callable[[argparse.Namespace], int]
VERBS: dict[str, tuple[Handler, str]] = {}
#: verbs that work without a daemon (in-process) but use it when it runs
DAEMON_FIRST = ("list", "dominfo", "dumpxml", "destroy")
#: read-only queries: answered by a daemon they import nothing but the standard library's
#: argparse, json and socket besides this module, :mod:`vmconfine.client` and
#: :mod:`vmconfine.config.layout` (no logging either: nothing here logs)
QUERIES = ("list", "dominfo", "dumpxml", "domstate")
VIRSH_EVENT = {"defined": "Defined", "undefined": "Undefined", "started": "Started",
               "suspended": "Suspended", "resumed": "Resumed", "stopped": "Stopped",
               "shutdown": "Shutdown", "crashed": "Crashed"}


def verb(name: str, help_text: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        VERBS[name] = (fn, help_text)
        return fn

    return deco


def _socket(args: argparse.Namespace, uri: str) -> tuple[str, str, Path]:
    """(URI, instance kind, daemon socket) of a local URI; a plain system or embed URI
    without the instance module (the start-up of every client verb)."""
    from vmconfine.config.layout import plain_daemon_socket

    given = getattr(args, "socket", None)
    plain = plain_daemon_socket(uri, readonly=args.readonly)
    if plain is not None:
        return uri, plain[0], Path(given or plain[1])
    from vmconfine.config.instance import open_instance

    inst = open_instance(uri)
    path = given or (inst.daemon_ro_socket_path if args.readonly else inst.daemon_socket_path)
    return inst.uri, inst.kind, Path(path)


def client(args: argparse.Namespace, *, required: bool = True) -> Any:
    """A client of the instance's daemon — over ssh or TLS for a remote URI; None when no
    local daemon runs and ``required`` is False. A session client starts its daemon."""
    from vmconfine.client import DaemonClient, listening, spawn_session_daemon
    from vmconfine.config.layout import default_uri, plain_uri

    target = args.connect or default_uri()
    if plain_uri(target) is None:
        from vmconfine.config.instance import parse_remote

        remote = parse_remote(target)
        if remote is not None:
            from vmconfine.remote import SSHTransport, TLSTransport

            if remote.transport == "ssh":
                return DaemonClient(SSHTransport(remote, readonly=args.readonly))
            return DaemonClient(TLSTransport(remote))
    uri, kind, path = _socket(args, target)
    if listening(path):
        return DaemonClient(path)
    if not required:
        return None
    if kind == "session":
        spawn_session_daemon(uri, path)
        return DaemonClient(path)
    raise VmconfineError(f"no vmconfine daemon serves {uri}; start it with "
                         f"'vmconfine -c \"{uri}\" daemon --daemon'")


def _domain_url(name: str, suffix: str = "") -> str:
    return f"/v1/domains/{quote(name, safe='')}{suffix}"


def _read_xml(path: str) -> tuple[str, str]:
    from vmconfine.inputs import read_text

    return read_text(path, expected="a domain XML file")


# ---- verbs that need the daemon -----------------------------------------------------------


@verb("daemon", "serve this instance: managed domains, lifecycle, events (see docs/daemon.md)")
def cmd_daemon(args: argparse.Namespace) -> int:
    from vmconfine.daemon.main import serve

    return serve(args.connect, background=args.daemon, pid_file=args.pid_file,
                 idle_timeout=args.timeout)


@verb("daemon-bridge", "relay stdin/stdout to this instance's daemon socket (the remote end of "
                      "qemu+ssh://, like libvirt's virt-ssh-helper)")
def cmd_daemon_bridge(args: argparse.Namespace) -> int:
    import os
    import select
    import socket

    c = client(args)
    sock = c.transport.connect(30)
    sock.settimeout(None)
    open_in = {0, sock.fileno()}
    while open_in:
        ready, _, _ = select.select(list(open_in), [], [])
        for fd in ready:
            data = os.read(fd, 65536) if fd == 0 else sock.recv(65536)
            if not data:
                open_in.discard(fd)
                if fd == 0:
                    sock.shutdown(socket.SHUT_WR)
                else:
                    return 0
                continue
            if fd == 0:
                sock.sendall(data)
            else:
                os.write(1, data)
    return 0


def _read_domain_xml(args: argparse.Namespace) -> tuple[str, str]:
    """The XML of ``define``/``create``; ``--validate`` checks it against libvirt's schema
    first (the daemon warns about, or refuses, what vmconfine does not implement)."""
    xml, source = _read_xml(args.file)
    if args.validate:
        from vmconfine.domain.schema import validate

        validate(xml, source)
    return xml, source


@verb("define", "define (or update) a persistent domain from an XML file")
def cmd_define(args: argparse.Namespace) -> int:
    xml, source = _read_domain_xml(args)
    name = client(args).call("POST", "/v1/domains", {"xml": xml, "action": "define"})["name"]
    print(f"Domain '{name}' defined from {source}")
    return 0


@verb("undefine", "remove a domain's persistent definition (a running domain keeps running)")
def cmd_undefine(args: argparse.Namespace) -> int:
    query = "?keep_tpm=1" if args.keep_tpm else ""
    name = client(args).call("DELETE", _domain_url(args.domain) + query)["name"]
    print(f"Domain '{name}' has been undefined")
    return 0


@verb("start", "start a defined domain (managed by the daemon; it outlives this command)")
def cmd_start(args: argparse.Namespace) -> int:
    name = client(args).call("POST", _domain_url(args.domain, "/start"),
                             {"paused": args.paused, "reset_nvram": args.reset_nvram})["name"]
    print(f"Domain '{name}' started")
    return 0


@verb("create", "start a transient domain from an XML file (managed by the daemon)")
def cmd_create(args: argparse.Namespace) -> int:
    xml, source = _read_domain_xml(args)
    name = client(args).call("POST", "/v1/domains", {"xml": xml, "action": "create",
                                                      "paused": args.paused})["name"]
    print(f"Domain '{name}' created from {source}")
    return 0


@verb("shutdown", "ask a domain's guest to power off (ACPI)")
def cmd_shutdown(args: argparse.Namespace) -> int:
    name = client(args).call("POST", _domain_url(args.domain, "/shutdown"),
                             {"timeout": args.timeout})["name"]
    print(f"Domain '{name}' {'is shut off' if args.timeout is not None else 'is being shutdown'}")
    return 0


def _action(verb_name: str, message: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        name = client(args).call("POST", _domain_url(args.domain, f"/{verb_name}"))["name"]
        print(message.format(name=name))
        return 0

    return handler


verb("reboot", "reboot a domain: ACPI power-off, then a fresh start")(
    _action("reboot", "Domain '{name}' is being rebooted"))
verb("reset", "reset a domain's virtual hardware (like the reset button)")(
    _action("reset", "Domain '{name}' was reset"))
verb("suspend", "pause a domain's virtual CPUs")(_action("suspend", "Domain '{name}' suspended"))
verb("resume", "resume a paused domain")(_action("resume", "Domain '{name}' resumed"))


def _device_verb(op: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        xml, _source = _read_xml(args.file)
        client(args).call("POST", _domain_url(args.domain, f"/devices/{op}"),
                          {"xml": xml, "live": args.live, "config": args.config,
                           "persistent": args.persistent})
        print(f"Device {op}ed successfully")
        return 0

    return handler


verb("attach-device", "attach a disk, chardev or USB hostdev to a domain (--live, --config, "
     "--persistent as virsh)")(_device_verb("attach"))
verb("detach-device", "detach a disk, chardev or USB hostdev from a domain (--live, --config, "
     "--persistent)")(_device_verb("detach"))


@verb("change-media", "eject, insert or update a CD-ROM/floppy medium (--eject, --insert, "
      "--update; --live, --config, --force)")
def cmd_change_media(args: argparse.Namespace) -> int:
    action = "eject" if args.eject else "insert" if args.insert else "update"
    source = os.path.abspath(args.source) if args.source else None
    reply = client(args).call("POST", _domain_url(args.domain, "/media"), {
        "target": args.target, "source": source, "action": action, "live": args.live,
        "config": args.config, "force": args.force})
    print(reply["message"])
    return 0


@verb("domstate", "print a domain's state (with --reason: why)")
def cmd_domstate(args: argparse.Namespace) -> int:
    st = client(args).call("GET", _domain_url(args.domain, "/state"))
    print(f"{st['state']} ({st['reason']})" if args.reason else st["state"])
    print()
    return 0


@verb("autostart", "start a defined domain whenever the daemon starts (--disable: not)")
def cmd_autostart(args: argparse.Namespace) -> int:
    name = client(args).call("PUT", _domain_url(args.domain, "/autostart"),
                             {"enable": not args.disable})["name"]
    print(f"Domain '{name}' {'unmarked' if args.disable else 'marked'} as autostarted")
    return 0


@verb("console", "connect this terminal to a domain's serial console (^] detaches)")
def cmd_console(args: argparse.Namespace) -> int:
    from vmconfine.client import UnixTransport, console_session

    c = client(args)
    name = c.call("GET", _domain_url(args.domain, "/state")) and args.domain
    print(f"Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r", flush=True)
    url = _domain_url(args.domain, "/console")
    if isinstance(c.transport, UnixTransport):
        console_session(c, url, c.transport.path)
    else:  # a remote daemon: the WebSocket client speaks to a local relay
        from vmconfine.remote import unix_relay

        with unix_relay(c.transport) as path:
            console_session(c, url, path)
    print("\r")
    return 0


@verb("event", "print lifecycle events (one, or all with --loop) until --timeout")
def cmd_event(args: argparse.Namespace) -> int:
    url = "/v1/events" + (f"?domain={quote(args.domain, safe='')}" if args.domain else "")
    count = 0
    for ev in client(args).stream(url, timeout=args.timeout):
        kind = VIRSH_EVENT.get(ev["event"], ev["event"].title())
        detail = str(ev["detail"]).replace("-", " ").title()
        print(f"event 'lifecycle' for domain '{ev['domain']}': {kind} {detail}", flush=True)
        count += 1
        if not args.loop:
            break
    print(f"events received: {count}")
    return 0


# ---- verbs that work without the daemon too ---------------------------------------------------


def daemon_first(args: argparse.Namespace) -> int | None:
    """Run a DAEMON_FIRST verb through the daemon when one runs; None: do it in-process."""
    c = client(args, required=False)
    if c is None:
        return None
    if args.verb == "list":
        domains = c.call("GET", "/v1/domains" + ("?all=1" if args.all else ""))["domains"]
        print(f" {'Id':<4} {'Name':<30} State")
        print("-" * 48)
        for d in domains:
            ident = "-" if d["id"] is None else str(d["id"])
            print(f" {ident:<4} {d['name']:<30} {d['state']}")
        print()
    elif args.verb == "dominfo":
        for k, v in c.call("GET", _domain_url(args.domain))["info"]:
            print(f"{k + ':':<16}{v}")
        print()
    elif args.verb == "dumpxml":
        query = "&".join(q for q, on in (("inactive=1", args.inactive),
                                          ("secure=1", args.security_info)) if on)
        sys.stdout.write(c.call("GET", _domain_url(args.domain, "/xml") +
                                (f"?{query}" if query else "")))
    elif args.verb == "destroy":
        name = c.call("POST", _domain_url(args.domain, "/destroy"))["name"]
        print(f"Domain '{name}' destroyed")
    return 0


def add_parsers(add: Callable[[str, Handler, str], argparse.ArgumentParser],
                seconds: Callable[[str], float]) -> None:
    """Add this module's verbs to the CLI's parser."""

    def sub(name: str) -> argparse.ArgumentParser:
        fn, help_text = VERBS[name]
        return add(name, fn, help_text)

    sp = sub("daemon-bridge")
    sp.add_argument("--socket", metavar="PATH", help="the daemon socket (default: the "
                    "instance's, read-only with -r)")
    sp = sub("daemon")
    sp.add_argument("--daemon", action="store_true",
                    help="fork into the background once the sockets listen")
    sp.add_argument("--pid-file", metavar="FILE", help="pid file (default: in the instance's "
                    "run directory)")
    sp.add_argument("--timeout", type=seconds, default=0, metavar="SECONDS",
                    help="exit after this long idle with no running domain (0: never)")
    for name in ("define", "create"):
        sp = sub(name)
        sp.add_argument("file", metavar="FILE.xml", help="domain XML ('-' for stdin)")
        sp.add_argument("--validate", action="store_true",
                        help="first validate the XML against libvirt's schema (domain.rng)")
        if name == "create":
            sp.add_argument("--paused", action="store_true", help="leave the CPUs stopped")
    for name in ("undefine", "start", "shutdown", "reboot", "reset", "suspend", "resume",
                 "domstate", "autostart", "console"):
        sp = sub(name)
        sp.add_argument("domain", metavar="NAME", help="domain name, id or UUID")
        if name == "start":
            sp.add_argument("--paused", action="store_true", help="leave the CPUs stopped")
            sp.add_argument("--reset-nvram", action="store_true",
                            help="make the UEFI NVRAM again from its template")
        elif name == "undefine":
            sp.add_argument("--keep-tpm", action="store_true",
                            help="keep the TPM emulator's state (default: removed, as virsh)")
        elif name == "shutdown":
            sp.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                            help="wait until the domain is shut off; fail after SECONDS")
        elif name == "domstate":
            sp.add_argument("--reason", action="store_true", help="also print why")
        elif name == "autostart":
            sp.add_argument("--disable", action="store_true", help="do not autostart it")
    for name in ("attach-device", "detach-device"):
        sp = sub(name)
        sp.add_argument("domain", metavar="NAME", help="domain name, id or UUID")
        sp.add_argument("file", metavar="FILE.xml", help="the device's XML ('-' for stdin)")
        sp.add_argument("--live", action="store_true", help="the running domain")
        sp.add_argument("--config", action="store_true", help="the persistent definition")
        sp.add_argument("--persistent", action="store_true", help="both (when running)")
        sp.add_argument("--current", action="store_true",
                        help="the running domain if it runs, else the definition (default)")
    sp = sub("change-media")
    sp.add_argument("domain", metavar="NAME", help="domain name, id or UUID")
    sp.add_argument("target", metavar="TARGET", help="the drive's target (hdc) or medium path")
    sp.add_argument("source", metavar="SOURCE", nargs="?", help="the new medium's image")
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--eject", action="store_true", help="eject the medium")
    what.add_argument("--insert", action="store_true", help="insert SOURCE into an empty drive")
    what.add_argument("--update", action="store_true",
                      help="replace the medium by SOURCE (default; no SOURCE: eject)")
    sp.add_argument("--live", action="store_true", help="the running domain")
    sp.add_argument("--config", action="store_true", help="the persistent definition")
    sp.add_argument("--current", action="store_true",
                    help="the running domain if it runs, else the definition (default)")
    sp.add_argument("--force", action="store_true", help="open a tray the guest locked")
    sp = sub("event")
    sp.add_argument("--domain", metavar="NAME", help="only this domain's events")
    sp.add_argument("--loop", action="store_true", help="keep printing events")
    sp.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                    help="stop waiting after SECONDS")
