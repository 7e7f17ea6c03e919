"""Which module may import which: the layering the design promises, checked on the source.

* ``spool`` never imports ``relay``: the spool is the bottom layer.
* The commands in ``relay/cli/`` reach neither the SMTP server (``relay.smtpd``), nor the
  SMTP client (``relay.delivery``), nor the scheduler (``relay.scheduler``), not even
  through another relay module; ``relay/cli/main.py``,
  which starts the daemon with ``relay serve``, is held to its own imports only.
* Commands touch queue files only through ``spool``: no path joined, no file renamed,
  linked, unlinked, listed or re-dated in ``relay/cli/``.
* Only ``relay/smtpd/engine.py`` imports aiosmtpd, only ``relay/delivery_engine.py``
  aiosmtplib.

Imports are read with ``ast`` (function-level imports included), never grepped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "relay" / "cli"
FORBIDDEN_TO_COMMANDS = ("relay.smtpd", "relay.delivery", "relay.scheduler")
# Who may import each third-party SMTP library.
SMTP_LIBRARIES = {
    "aiosmtpd": {"relay/smtpd/engine.py"},
    "aiosmtplib": {"relay/delivery_engine.py"},
}
# Calls that would mean a command handles spool files itself.
SPOOL_FILE_CALLS = {"os.path.join", "os.rename", "os.replace", "os.unlink", "os.remove",
                    "os.utime", "os.link", "os.scandir", "os.listdir", "os.mkdir", "os.makedirs",
                    "os.rmdir", "shutil.move", "shutil.rmtree", "shutil.copy"}


def sources(*packages: str) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports, at any level, as absolute dotted names (for
    ``from package import name`` both ``package`` and ``package.name``)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                package = module_name(path).split(".")
                if path.name != "__init__.py":
                    package.pop()
                anchor = package[:len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sources("relay", "spool")}


def reachable(start: Path, modules: dict[str, Path]) -> dict[str, list[str]]:
    """The project modules ``start`` imports, directly or through others, each with the
    chain of imports that leads to it."""
    chains: dict[str, list[str]] = {}
    todo = [(start, [module_name(start)])]
    while todo:
        path, chain = todo.pop()
        for name in sorted(imports(path)):
            if name in modules and name not in chains:
                chains[name] = [*chain, name]
                todo.append((modules[name], chains[name]))
    return chains


def is_within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_spool_never_imports_relay() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imports(p) if is_within(n, ("relay",)))
                 for p in sources("spool")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_commands_reach_neither_the_server_nor_the_client_nor_the_scheduler() -> None:
    modules = project_modules()
    offenders: dict[str, list[str]] = {}
    for path in sources("relay/cli"):
        if path.name == "main.py":
            names = {n: [n] for n in imports(path)}  # relay serve: its own imports only
        else:
            names = reachable(path, modules)
        for name, chain in names.items():
            if is_within(name, FORBIDDEN_TO_COMMANDS):
                offenders[str(path.relative_to(ROOT))] = chain
    assert offenders == {}


def test_commands_touch_spool_files_only_through_spool() -> None:
    offenders: list[str] = []
    for path in sources("relay/cli"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in SPOOL_FILE_CALLS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert offenders == []


def test_smtp_libraries_stay_in_their_modules() -> None:
    offenders: dict[str, list[str]] = {}
    for path in sources("relay", "spool"):
        where = str(path.relative_to(ROOT))
        for library, allowed in SMTP_LIBRARIES.items():
            if where not in allowed and any(is_within(n, (library,)) for n in imports(path)):
                offenders.setdefault(library, []).append(where)
    assert offenders == {}


def test_the_rules_can_fail(tmp_path: Path) -> None:
    """The reader sees the imports these rules look for, wherever they are written."""
    source = tmp_path / "sample.py"
    source.write_text("import aiosmtpd.smtp\n"
                      "def f():\n"
                      "    from relay import scheduler\n"
                      "    from relay.delivery import SMTPDelivery\n")
    found = imports(source)
    assert {"aiosmtpd.smtp", "relay", "relay.scheduler", "relay.delivery",
            "relay.delivery.SMTPDelivery"} <= found
    assert is_within("aiosmtpd.smtp", ("aiosmtpd",))
    assert [n for n in sorted(found) if is_within(n, FORBIDDEN_TO_COMMANDS)] == [
        "relay.delivery", "relay.delivery.SMTPDelivery", "relay.scheduler"]
    # A command that reached the scheduler through another module would be named with
    # the chain that leads there.
    chains = reachable(ROOT / "relay" / "qmgrd.py", project_modules())
    assert chains["relay.scheduler"] == ["relay.qmgrd", "relay.scheduler"]
