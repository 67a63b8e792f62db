#!/usr/bin/env python3
"""Check that ``python/rslora_fast/_core.pyi`` matches the built ``rslora_fast._core`` module.

Compares the public names (functions, classes, and each class's public methods and properties)
and, where the extension exposes one, each callable's parameter names and defaults against the
stub's. Prints every difference and exits 1 on drift, 0 when they agree.

Usage: ``python scripts/check_stubs.py [path/to/_core.pyi]``
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

DEFAULT_STUB = Path(__file__).resolve().parent.parent / "python" / "rslora_fast" / "_core.pyi"
# Members every extension class or module has that the stub need not list.
_IGNORED = {"__new__", "__init__", "__repr__", "__doc__", "__module__"}


def _params(args: ast.arguments) -> list[tuple[str, str | None]]:
    """(name, default source or None) for each parameter of a stub function, ``self``/``cls`` dropped."""
    pos = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(pos) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, None if d is None else ast.unparse(d)) for a, d in zip(pos, defaults)]
    out += [(a.arg, None if d is None else ast.unparse(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.vararg:
        out.append(("*" + args.vararg.arg, None))
    if args.kwarg:
        out.append(("**" + args.kwarg.arg, None))
    if out and out[0][0] in ("self", "cls"):
        out = out[1:]
    return out


def read_stub(path: Path) -> tuple[dict[str, list], dict[str, dict[str, list | str]]]:
    """Functions ``{name: params}`` and classes ``{name: {member: params | "property"}}`` of a stub."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    funcs: dict[str, list] = {}
    classes: dict[str, dict[str, list | str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):  # re-exported classes (``from m import X as X``)
            for alias in node.names:
                if alias.asname == alias.name and alias.name[:1].isupper():
                    classes[alias.name] = {}
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            funcs[node.name] = _params(node.args)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            members: dict[str, list | str] = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    props = any(ast.unparse(d) == "property" for d in item.decorator_list)
                    members[item.name] = "property" if props else _params(item.args)
            classes[node.name] = members
    return funcs, classes


def _runtime_params(obj) -> list[tuple[str, str | None]] | None:
    """(name, repr of default) from the callable's text signature, or None when it has none."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls", "$self", "$type"):
            continue
        name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        out.append((name, None if p.default is p.empty else repr(p.default)))
    return out


def _is_property(obj) -> bool:
    return inspect.isdatadescriptor(obj) or isinstance(obj, property)


def read_module(mod) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """Public functions and classes (with their public members) of the built module."""
    funcs: dict[str, object] = {}
    classes: dict[str, dict[str, object]] = {}
    for name in dir(mod):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        if inspect.isclass(obj):
            classes[name] = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        elif callable(obj):
            funcs[name] = obj
    return funcs, classes


def compare(mod, stub_path: Path) -> list[str]:
    """Every difference between the module and the stub, as messages (empty: no drift)."""
    problems: list[str] = []
    s_funcs, s_classes = read_stub(stub_path)
    m_funcs, m_classes = read_module(mod)
    for name in sorted(set(m_funcs) - set(s_funcs)):
        problems.append(f"function {name} is in the extension but not in the stub")
    for name in sorted(set(s_funcs) - set(m_funcs)):
        problems.append(f"function {name} is in the stub but not in the extension")
    for name in sorted(set(m_funcs) & set(s_funcs)):
        got = _runtime_params(m_funcs[name])
        if got is not None and got != s_funcs[name]:
            problems.append(f"function {name}: extension parameters {got} != stub {s_funcs[name]}")
    for name in sorted(set(m_classes) - set(s_classes)):
        problems.append(f"class {name} is in the extension but not in the stub")
    for name in sorted(set(s_classes) - set(m_classes)):
        problems.append(f"class {name} is in the stub but not in the extension")
    for name in sorted(set(m_classes) & set(s_classes)):
        m_mem, s_mem = m_classes[name], {k: v for k, v in s_classes[name].items() if k not in _IGNORED}
        for k in sorted(set(m_mem) - set(s_mem)):
            problems.append(f"{name}.{k} is in the extension but not in the stub")
        for k in sorted(set(s_mem) - set(m_mem)):
            problems.append(f"{name}.{k} is in the stub but not in the extension")
        for k in sorted(set(m_mem) & set(s_mem)):
            is_prop = _is_property(m_mem[k]) and not callable(m_mem[k])
            if is_prop != (s_mem[k] == "property"):
                kind = "a property" if is_prop else "a method"
                problems.append(f"{name}.{k} is {kind} in the extension but not in the stub")
            elif not is_prop:
                got = _runtime_params(m_mem[k])
                if got is not None and got != s_mem[k]:
                    problems.append(f"{name}.{k}: extension parameters {got} != stub {s_mem[k]}")
        ctor = _runtime_params(getattr(mod, name)) if "__new__" in s_classes[name] else None
        if ctor is not None and ctor != s_classes[name]["__new__"]:
            problems.append(f"{name}(): extension parameters {ctor} != stub {s_classes[name]['__new__']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    stub = Path(argv[0]) if argv else DEFAULT_STUB
    mod = importlib.import_module("rslora_fast._core")
    problems = compare(mod, stub)
    for p in problems:
        print(f"stub drift: {p}", file=sys.stderr)
    if problems:
        print(f"{stub}: {len(problems)} difference(s) with {mod.__file__}", file=sys.stderr)
        return 1
    print(f"{stub.name} matches {Path(mod.__file__).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
