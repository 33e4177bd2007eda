"""``dominfo``: what to say about a running domain (shared by the CLI and the daemon).

Kept apart from :mod:`vmconfine.launch.attach` (which needs the native-argv converter) so
the daemon, which only reads an adopted domain's state, never imports that converter."""

from __future__ import annotations

from vmconfine.launch.connection import Connection, RunningDomain
from vmconfine.launch.journal import Journal
from vmconfine.plugin.context import DomainContext


def adopted_qmp_path(dom: RunningDomain) -> str | None:
    """The QMP socket of an adopted domain (status state ``qmp``), None for others."""
    value = dom.domain.runtime_state().get("qmp")
    return value if isinstance(value, str) and value else None


def domain_info_rows(conn: Connection, dom: RunningDomain, *, state: str = "running",
                     persistent: str = "no", autostart: str = "disable") -> list[tuple[str, str]]:
    """virsh dominfo's rows, then per stacked security driver its model, DOI and the label
    the kernel reports, each driver's confinement summary, and the taints."""
    d = dom.domain
    rows = [
        ("Id", str(dom.id)),
        ("Name", d.name),
        ("UUID", d.uuid),
        ("OS Type", d.os.type or "hvm"),
        ("State", state if dom.alive else "shut off"),
        ("CPU(s)", str(d.vcpus)),
        ("Max memory", f"{d.memory_kib} KiB"),
        ("Used memory", f"{d.current_memory_kib or d.memory_kib} KiB"),
        ("Persistent", persistent),
        ("Autostart", autostart),
        ("Managed save", "no"),
        ("PID", str(dom.pid)),
    ]
    ctx = DomainContext(conn.host, d, Journal(conn.instance.journal_path(d.name)), pid=dom.pid)
    for model, doi, label in conn.stack.process_labels(ctx, dom.pid):
        rows += [("Security model", model), ("Security DOI", doi),
                 ("Security label", label or "-")]
    adopted = adopted_qmp_path(dom)
    if adopted is not None:  # started outside vmconfine: no confinement was applied
        rows.append(("QMP socket", adopted))
    for name, desc in (conn.stack.describe(ctx) if adopted is None else {}).items():
        if isinstance(desc, dict) and desc.get("summary"):
            rows.append((f"Confinement ({name})", str(desc["summary"])))
    if dom.taints:
        rows.append(("Tainted", ", ".join(dom.taints)))
    return rows
