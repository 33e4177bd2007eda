"""The ``vmconfine`` command line: virsh-like verbs over one instance.

Every failure prints one line ``error: ...`` and exits 1; ``--debug`` shows tracebacks and
pluggy hook tracing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vmconfine import __version__, cli_daemon
from vmconfine.errors import VmconfineError
from vmconfine.inputs import read_text
from vmconfine.sanitize import SafeStream, json_text, one_line

Handler = Callable[[argparse.Namespace], int]
_VERBS: dict[str, tuple[Handler, str]] = {}


def verb(name: str, help_text: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _VERBS[name] = (fn, help_text)
        return fn

    return deco


def _read_input(path: str) -> tuple[str, str]:
    return read_text(path, expected="a domain XML file")


def _connect(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from vmconfine.launch.connection import Connection

    return Connection.open(args.connect)


def _parse_file(path: str, validate: bool = False):  # type: ignore[no-untyped-def]
    from vmconfine.domain import parse_domain

    text, source = _read_input(path)
    if validate:
        from vmconfine.domain.schema import validate as validate_schema

        validate_schema(text, source)
    return parse_domain(text, source=source)


def _load_domain(args: argparse.Namespace, conn):  # type: ignore[no-untyped-def]
    """The domain XML a verb starts or shows: ``--validate`` against libvirt's schema, then
    every element vmconfine does not implement warned about or refused (qemu.conf
    ``unsupported_xml``)."""
    from vmconfine.domain.support import enforce

    domain = _parse_file(getattr(args, "file", None) or args.target, args.validate)
    enforce(domain, conn.instance.config.unsupported_xml)
    return domain


# ---- verbs ------------------------------------------------------------------------------------


@verb("capabilities", "print the host's capabilities XML (secmodels, guests)")
def cmd_capabilities(args: argparse.Namespace) -> int:
    from vmconfine.qemu.capabilities import capabilities_xml

    sys.stdout.write(capabilities_xml(_connect(args)))
    return 0


@verb("drivers", "list installed drivers and whether they work on this host")
def cmd_drivers(args: argparse.Namespace) -> int:
    from vmconfine.plugin.stack import Stack

    conn = _connect(args)
    rows = []
    for info, ok, why in Stack.probe_installed(conn.host):
        state = "available" if ok else f"unavailable: {why}"
        if ok and why:
            state = f"available ({why})"
        rows.append((info.name, info.kind, info.description, state))
    w = max(len(r[0]) for r in rows)
    for name, kind, desc, state in rows:
        print(f"{name:<{w}}  {kind:<8}  {desc}\n{'':<{w}}  {'':<8}  {state}")
    return 0


@verb("config", "print the effective qemu.conf settings (with --check: report problems)")
def cmd_config(args: argparse.Namespace) -> int:
    from vmconfine.plugin.stack import Stack

    conn = _connect(args)
    host = conn.host
    if args.file is not None:  # another file, e.g. before installing it: it must exist
        host = conn.host.with_config_file(Path(args.file))
    cfg = host.config
    if not args.check:
        auto = ", ".join([*(info.name for info in host.registry.autodetected()), "none"])
        sys.stdout.write(cfg.format({"security_driver": f"autodetect: {auto}"}))
        return 0
    problems = cfg.check()
    stack_problems = Stack.check_config(host)
    for p in [*problems, *stack_problems]:
        print(p)
    if not problems and not stack_problems:
        where = cfg.path or f"{host.instance.config_path} (absent: every setting has its default)"
        print(f"{where}: no problems found")
    return 1 if cfg.unknown or stack_problems else 0


@verb("domxml-to-native", "print the QEMU command line for a domain XML (format qemu-argv)")
def cmd_to_native(args: argparse.Namespace) -> int:
    from vmconfine.launch.pipeline import native_command

    if args.format != "qemu-argv":
        raise VmconfineError(f"unsupported native format '{args.format}' (supported: qemu-argv)")
    conn = _connect(args)
    domain = _load_domain(args, conn)
    print(native_command(conn, domain).format_native())
    return 0


@verb("domxml-from-native", "print domain XML for a QEMU command line (format qemu-argv)")
def cmd_from_native(args: argparse.Namespace) -> int:
    from vmconfine.qemu.fromnative.convert import convert_file

    if args.format != "qemu-argv":
        raise VmconfineError(f"unsupported native format '{args.format}' (supported: qemu-argv)")
    result = convert_file(args.file)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    sys.stdout.write(result.xml)
    return 0


@verb("qemu-attach", "adopt a QEMU process started outside vmconfine (it needs a QMP socket)")
def cmd_qemu_attach(args: argparse.Namespace) -> int:
    from vmconfine.launch.attach import attach_command

    return attach_command(_connect(args), args.pid, foreground=args.foreground)


def _print_started(conn, launched) -> None:  # type: ignore[no-untyped-def]
    ctx = launched.ctx
    print(f"Domain '{launched.name}' started (id {launched.domain_id}, pid {launched.pid})")
    for model, _doi, label in conn.stack.process_labels(ctx, launched.pid):
        print(f"  security model {model}: {label or '-'}")
    for name, desc in conn.stack.describe(ctx).items():
        summary = desc.get("summary") if isinstance(desc, dict) else None
        if summary:
            print(f"  {name}: {summary}")
    if ctx.taints:
        print(f"  tainted: {', '.join(ctx.taints)}")
    for alias, path in launched.ptys.items():
        print(f"  {alias}: {path}")
    sys.stdout.flush()


@verb("run", "start a domain in the foreground and wait until it stops (like virt-qemu-run)")
def cmd_run(args: argparse.Namespace) -> int:
    from vmconfine.launch.supervisor import run_domain

    def diagnose(ctx, tail):  # type: ignore[no-untyped-def]
        # the report code is imported only when a start fails (start-up time)
        from vmconfine.report.build import open_failure_hint

        return open_failure_hint(conn, ctx, tail)

    conn = _connect(args)
    domain = _load_domain(args, conn)
    outcome = run_domain(conn, domain, paused=args.paused, reset_nvram=args.reset_nvram,
                         shutdown_timeout=args.shutdown_timeout,
                         on_ready=lambda started: _print_started(conn, started),
                         diagnose=diagnose)
    name = domain.name
    if outcome.ok:
        print(f"Domain '{name}' stopped: {outcome.detail}")
        return 0
    raise VmconfineError(f"domain '{name}' stopped: {outcome.detail}")


@verb("list", "list running domains (--all: defined ones too)")
def cmd_list(args: argparse.Namespace) -> int:
    from vmconfine.daemon.store import DefinitionStore

    conn = _connect(args)
    print(f" {'Id':<4} {'Name':<30} State")
    print("-" * 48)
    running = conn.running()
    for dom in running:
        print(f" {dom.id:<4} {dom.name:<30} {'running' if dom.alive else 'shut off'}")
    if args.all:
        names = {d.name for d in running}
        for name in DefinitionStore(conn.instance).names():
            if name not in names:
                print(f" {'-':<4} {name:<30} shut off")
    print()
    return 0


@verb("dumpxml", "print a running domain's live XML (with generated labels)")
def cmd_dumpxml(args: argparse.Namespace) -> int:
    from vmconfine.domain.xml import without_secrets

    conn = _connect(args)
    dom = conn.lookup(args.domain)
    text = dom.domain.to_xml(live=False) if args.inactive else dom.status_path.read_text()
    sys.stdout.write(text if args.security_info else without_secrets(text, "<dumpxml>"))
    return 0


@verb("dominfo", "print information about a running domain, including its security labels")
def cmd_dominfo(args: argparse.Namespace) -> int:
    from vmconfine.launch.info import domain_info_rows

    conn = _connect(args)
    rows = domain_info_rows(conn, conn.lookup(args.domain))
    for k, v in rows:
        print(f"{k + ':':<16}{v}")
    print()
    return 0


@verb("destroy", "kill a running domain (its supervising vmconfine tears it down)")
def cmd_destroy(args: argparse.Namespace) -> int:
    from vmconfine.launch import runtime

    conn = _connect(args)
    dom = conn.lookup(args.domain)
    conn.instance.destroy_marker_path(dom.name).touch()
    runtime.kill_process(dom.pid, dom.starttime)
    deadline = time.monotonic() + 60
    # its teardown takes ~10 ms: a check is one open + flock (microseconds), so look often
    while runtime.supervisor_alive(conn.instance, dom.name) and time.monotonic() < deadline:
        time.sleep(0.005)
    conn.recover()  # if the supervisor is gone too, finish its teardown here
    print(f"Domain '{dom.name}' destroyed")
    return 0


@verb("qemu-monitor-command", "send a raw QMP command (or HMP with --hmp) to a running domain")
def cmd_monitor(args: argparse.Namespace) -> int:
    from vmconfine.launch import runtime
    from vmconfine.launch.attach import monitor_command
    from vmconfine.qemu import qmp

    conn = _connect(args)
    dom = conn.lookup(args.domain)
    text = " ".join(args.command)
    payload = qmp.hmp_payload(text) if args.hmp else qmp.parse_command_text(text)
    if "custom-monitor" not in dom.taints:
        _add_taint(conn, dom, "custom-monitor")
    reply = monitor_command(conn, dom, payload)
    if args.hmp and "return" in reply:
        sys.stdout.write(str(reply["return"]))
        return 0 if "error" not in reply else 1
    print(json_text(reply, indent=2 if args.pretty else None))
    _ = runtime
    return 1 if "error" in reply else 0


@verb("confinement", "show what confines a domain's QEMU, per resource and for the process "
      "(a domain XML before start, or a running domain's kernel view)")
def cmd_confinement(args: argparse.Namespace) -> int:
    from vmconfine.config.instance import open_instance
    from vmconfine.launch.connection import Connection
    from vmconfine.report.build import build_report
    from vmconfine.report.render import render_text

    conn = Connection(open_instance(args.connect), recover=False)  # a report changes nothing
    target = args.target
    if target == "-" or target.endswith(".xml") or os.path.isfile(target):
        report = build_report(conn, _load_domain(args, conn))
    else:
        report = build_report(conn, running=conn.lookup(target))
    if args.json:
        print(json_text(report.to_json(), indent=2))
    else:
        sys.stdout.write(render_text(report))
    return 1 if report.errors or report.differences else 0


@verb("host-validate", "check that this host can run confined QEMU as qemu.conf asks "
      "(like virt-host-validate); exit status 1 on any FAIL")
def cmd_host_validate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vmconfine.config.instance import open_instance
    from vmconfine.launch.connection import Connection
    from vmconfine.report.validate import host_validate, render_checks

    conn = Connection(open_instance(args.connect), recover=False)
    checks = host_validate(conn, args.image_dir)
    if args.json:
        print(json_text([asdict(c) for c in checks], indent=2))
    else:
        sys.stdout.write(render_checks(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _add_taint(conn, dom, flag: str) -> None:  # type: ignore[no-untyped-def]
    import logging

    from vmconfine.domain import parse_domain
    from vmconfine.launch import runtime

    logging.getLogger("vmconfine").warning("domain %s is tainted: %s", dom.name, flag)
    with runtime.instance_lock(conn.instance):
        try:
            text = dom.status_path.read_text()
        except FileNotFoundError:
            return
        d = parse_domain(text, source=str(dom.status_path))
        state = d.runtime_state()
        taints = [t for t in state.get("taints", "").split(",") if t]
        if flag in taints:
            return
        taints.append(flag)
        state["taints"] = ",".join(taints)
        runtime.write_atomic(dom.status_path,
                             d.to_xml(live=True, extra={"id": dom.id, "state": state}),
                             durable=False)


# ---- parser -----------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds (0 or more)")
    return value


def _validate_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--validate", action="store_true",
                    help="first validate the XML against libvirt's schema (domain.rng)")


def _columns() -> int:
    """The terminal's width as :func:`shutil.get_terminal_size` finds it ($COLUMNS, else
    standard output's terminal, else 80)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        stdout = sys.__stdout__
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns if stdout else 0
        except (ValueError, OSError):  # closed, detached, not a terminal
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, its width found without importing :mod:`shutil` (with
    the compression modules it imports, a few ms of every command: argparse makes a
    formatter for each ``add_argument``)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


class _Unused:
    """Stands in for the parser of a verb the command line does not name: argparse's set-up
    of one parser costs ~1 ms (gettext looks for message catalogues for each of its strings),
    ~35 ms for every verb, so a command builds only its own (:func:`verb_of`)."""

    def add_argument(self, *_args: object, **_kwargs: object) -> None:
        return None

    def set_defaults(self, **_kwargs: object) -> None:
        return None

    def add_mutually_exclusive_group(self, **_kwargs: object) -> _Unused:
        return self


#: top-level options; those with a value (the value is the next word unless attached)
_TOP_FLAGS = ("-r", "--readonly", "--debug")
_TOP_VALUES = ("-c", "--connect")


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb of a command line whose words before it are top-level options (so only its
    parser is needed), else None (help, version, a mistake: the whole parser answers)."""
    words = iter(argv)
    for word in words:
        if word in _TOP_FLAGS or word.startswith("--connect="):
            continue
        if word in _TOP_VALUES:
            next(words, None)
            continue
        if word.startswith("-c") and not word.startswith("--"):
            continue  # -cURI
        return None if word.startswith("-") else word
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``only``, the parsers of the other verbs are left out (and
    :class:`LookupError` is raised when ``only`` is not a verb)."""
    p = argparse.ArgumentParser(
        prog="vmconfine",
        formatter_class=_Formatter,
        description="Run confined QEMU/KVM virtual machines described in libvirt domain XML.",
        epilog="URIs: qemu:///system (root), qemu:///session, qemu:///embed?root=DIR. "
        "Default: $VMCONFINE_DEFAULT_URI, else system for root and session otherwise.",
    )
    p.add_argument("-c", "--connect", metavar="URI", help="instance to use")
    p.add_argument("-r", "--readonly", action="store_true",
                   help="use the daemon's read-only socket (queries only)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks, debug logging and pluggy hook tracing")
    p.add_argument("--version", action="version", version=f"vmconfine {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    made: list[str] = []

    def add_daemon_verb(name: str, fn: Handler, help_text: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Unused()  # type: ignore[return-value]
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=_Formatter)
        sp.set_defaults(func=fn)
        made.append(name)
        return sp

    def add(name: str) -> argparse.ArgumentParser:
        fn, help_text = _VERBS[name]
        return add_daemon_verb(name, fn, help_text)

    add("capabilities")
    add("drivers")
    sp = add("config")
    sp.add_argument("--check", action="store_true", help="list problems; exit status 1 for an "
                    "unknown key or a configured security driver that is not installed or "
                    "not available")
    sp.add_argument("file", nargs="?", metavar="FILE", help="a qemu.conf to read instead of "
                    "the instance's (it must exist)")
    sp = add("domxml-to-native")
    sp.add_argument("format", metavar="FORMAT", help="native format: qemu-argv")
    sp.add_argument("file", metavar="FILE.xml", help="domain XML ('-' for stdin)")
    _validate_flag(sp)
    sp = add("domxml-from-native")
    sp.add_argument("format", metavar="FORMAT", help="native format: qemu-argv")
    sp.add_argument("file", metavar="FILE", help="file holding a QEMU command line ('-' for "
                    "stdin)")
    sp = add("run")
    sp.add_argument("file", metavar="FILE.xml", help="domain XML ('-' for stdin)")
    _validate_flag(sp)
    sp.add_argument("--paused", action="store_true", help="leave the guest CPUs stopped")
    sp.add_argument("--reset-nvram", action="store_true", help="make the UEFI NVRAM again "
                    "from its template (virsh start --reset-nvram)")
    sp.add_argument("--shutdown-timeout", type=_seconds, default=None, metavar="SECONDS",
                    help="on SIGINT/SIGTERM wait this long for an ACPI power-off before "
                    "destroying (default: qemu.conf shutdown_timeout, 30)")
    sp = add("list")
    sp.add_argument("--all", action="store_true", help="also defined domains that are shut off")
    for name in ("dumpxml", "dominfo", "destroy"):
        sp = add(name)
        sp.add_argument("domain", metavar="NAME", help="domain name, id or UUID")
        if name == "dumpxml":
            sp.add_argument("--inactive", action="store_true", help="the XML as given, "
                            "without generated labels")
            sp.add_argument("--security-info", action="store_true", help="include "
                            "security-sensitive information (graphics passwords); refused "
                            "on a read-only connection")
    sp = add("qemu-attach")
    sp.add_argument("pid", metavar="PID", help="process id of the running QEMU")
    sp.add_argument("--foreground", action="store_true", help="supervise it in this process "
                    "until QEMU exits (default: a detached supervisor)")
    sp = add("qemu-monitor-command")
    sp.add_argument("domain", metavar="NAME", help="domain name, id or UUID")
    sp.add_argument("--hmp", action="store_true", help="CMD is a human monitor command")
    sp.add_argument("--pretty", action="store_true", help="indent the JSON reply")
    sp.add_argument("command", nargs="+", metavar="CMD", help="QMP JSON or HMP text")
    sp = add("confinement")
    sp.add_argument("target", metavar="FILE.xml|NAME", help="a domain XML ('-' for stdin) or "
                    "a running domain's name, id or UUID; exit status 1 when problems or "
                    "differences are found")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    _validate_flag(sp)
    sp = add("host-validate")
    sp.add_argument("--image-dir", action="append", default=[], metavar="DIR",
                    help="also check xattr support where images live (repeatable)")
    sp.add_argument("--json", action="store_true", help="print the checks as JSON")

    cli_daemon.add_parsers(add_daemon_verb, _seconds)
    if only is not None and not made:
        raise LookupError(only)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; everything it prints goes through :class:`SafeStream` (text from
    QEMU, the guest, /proc or files vmconfine did not write never reaches the terminal raw)."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(out), SafeStream(err)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err


def _setup_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="vmconfine: %(levelname)s: %(message)s" if not debug else
        "%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if debug:
        os.environ["VMCONFINE_TRACE_HOOKS"] = "1"
        os.environ["VMCONFINE_DEBUG"] = "1"
    else:  # its own connection errors are reported by vmconfine in one line
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL + 1)  # its tracebacks too


def _print_traceback() -> None:
    import traceback

    traceback.print_exc()


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(verb_of(words))
    except LookupError:  # not a verb: the whole parser says so, with the list of verbs
        parser = build_parser()
    args = parser.parse_args(words)
    debug = args.debug or os.environ.get("VMCONFINE_DEBUG", "") not in ("", "0")
    # a query answered by the daemon logs nothing here: logging is set up (and imported)
    # only if it runs in-process
    quiet = not debug and args.verb in cli_daemon.QUERIES
    if not quiet:
        _setup_logging(debug)
    try:
        if args.verb in cli_daemon.DAEMON_FIRST:
            status = cli_daemon.daemon_first(args)
            if status is not None:
                return status
            if quiet:
                _setup_logging(debug)
        return args.func(args)
    except VmconfineError as exc:
        if debug:
            _print_traceback()
        # one line (a value from the XML, QEMU or /proc cannot start a forged line of its
        # own); --debug keeps multi-line details such as the child's traceback
        print(f"error: {exc.message if debug else one_line(exc.message)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a host path vmconfine itself needed (state dirs, sockets)
        if debug:
            _print_traceback()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback without --debug
        if debug:
            _print_traceback()
        print(f"error: internal error: {type(exc).__name__}: {one_line(str(exc))} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
