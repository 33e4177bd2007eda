"""How vmconfine's AppArmor driver starts vmconfine-aa-helper: an isolated interpreter.

The helper runs on every start and stop of a confined domain, so its start-up is part of both.
The console script ``vmconfine-aa-helper`` starts a normal interpreter: the ``site`` module
scans site-packages and runs every ``.pth`` file there (an editable install's import hook
alone costs ~10 ms), and the interpreter honours ``PYTHONPATH`` and friends until ``main()``
clears the environment.

:func:`command` gives ``PYTHON -I -S -c BOOT``: isolated mode (no ``PYTHON*`` environment
variables, no user site directory, no current or script directory on ``sys.path``) and no
``site`` (no site-packages, no ``.pth`` code). BOOT makes exactly the helper's packages
importable, from the directories the calling interpreter imports them from (its own, already
trusted, import system): vmconfine (domain model, resources), vmconfine_aa_helper,
vmconfine_apparmor (template and abstraction; found, never imported) and lxml's directory. The
helper's ``main()`` then clears the environment as before.
"""

from __future__ import annotations

import os
import sys

#: first-party packages, mapped by name to their directory (works for editable installs too)
PACKAGES = ("vmconfine", "vmconfine_aa_helper", "vmconfine_apparmor")
#: third-party packages whose parent directory goes on sys.path
THIRD_PARTY = ("lxml",)

BOOT = """\
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader
PACKAGES = {packages!r}
class PackageFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        where = PACKAGES.get(name)
        if where is None:
            return None
        init = where + '/__init__.py'
        spec = ModuleSpec(name, SourceFileLoader(name, init), origin=init, is_package=True)
        spec.submodule_search_locations = [where]
        spec.has_location = True
        return spec
sys.meta_path.insert(0, PackageFinder)
sys.path.extend({paths!r})
from vmconfine_aa_helper.main import main
sys.exit(main())
"""

_COMMAND: list[str] | None = None


def _package_dir(name: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if len(locations) != 1 or not os.path.isabs(locations[0]):
        return None
    where = os.path.normpath(locations[0])
    return where if os.path.isfile(os.path.join(where, "__init__.py")) else None


def boot_code() -> str | None:
    """The BOOT program for this interpreter's installation, None when a package is missing
    (or is not a plain directory package)."""
    packages = {}
    for name in PACKAGES:
        where = _package_dir(name)
        if where is None:
            return None
        packages[name] = where
    paths = []
    for name in THIRD_PARTY:
        where = _package_dir(name)
        if where is None:
            return None
        if os.path.dirname(where) not in paths:
            paths.append(os.path.dirname(where))
    return BOOT.format(packages=packages, paths=paths)


def command(python: str | None = None) -> list[str] | None:
    """``[python, -I, -S, -c, BOOT]`` (append the helper's arguments), or None when the
    packages cannot be located (the caller then runs the console script)."""
    global _COMMAND
    exe = python or sys.executable
    if not exe or not os.path.isabs(exe):
        return None
    if python is None and _COMMAND is not None:
        return list(_COMMAND)
    code = boot_code()
    if code is None:
        return None
    cmd = [exe, "-I", "-S", "-c", code]
    if python is None:
        _COMMAND = cmd
    return list(cmd)
