"""No code path in selfcam may unpickle or evaluate what a user hands it (issue 8.2).

Every ``.py`` file under ``src/selfcam`` is parsed with ``ast``; the scan resolves import
aliases (``import pickle as p``, ``from pickle import load as l``, ``getattr(pickle, "load")``,
``importlib.import_module("pickle")``) to qualified names and fails on any use of
``pickle.load(s)`` / ``pickle.Unpickler``, ``torch.load`` without ``weights_only=True``,
``numpy.load`` with ``allow_pickle`` not literally ``False``, ``eval`` / ``exec``,
``yaml.load`` without a safe loader, ``shelve``, ``marshal.load(s)``, ``dill`` and
``joblib.load``. The self-test feeds it one snippet per forbidden call so the scan can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "selfcam"

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}
FORBIDDEN = {  # qualified names that are never allowed, called or not
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads",
    "joblib.load", "builtins.eval", "builtins.exec", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
    "yaml.full_load_all", "pandas.read_pickle", "torch.serialization.load",
}  # fmt: skip
FORBIDDEN_MODULES = {"shelve", "dill"}  # importing them at all
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


class _Scanner(ast.NodeVisitor):
    """Collects ``(line, problem)`` for one module."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {"eval": "builtins.eval", "exec": "builtins.exec"}
        self.problems: list[tuple[int, str]] = []
        self._checked: set[int] = set()  # ids of name nodes already judged as a call's function

    def flag(self, node: ast.AST, what: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), what))

    def qualname(self, node: ast.AST) -> str | None:
        """``a.b.c`` with ``a`` resolved through the module's imports; ``getattr(m, "x")`` too."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
            base, attr = self.qualname(node.args[0]), node.args[1]
            if base and isinstance(attr, ast.Constant) and isinstance(attr.value, str):
                return f"{base}.{attr.value}"
        if isinstance(node, ast.Call) and self.qualname(node.func) in ("importlib.import_module", "builtins.__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                return node.args[0].value
        return None

    def check_module(self, node: ast.AST, module: str) -> None:
        if module.split(".")[0] in FORBIDDEN_MODULES:
            self.flag(node, f"imports {module}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.check_module(node, alias.name)
            if alias.asname:
                self.names[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.names[top] = top
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        self.check_module(node, module)
        for alias in node.names:
            if alias.name == "*" and module.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"from {module} import *")
            self.names[alias.asname or alias.name] = f"{module}.{alias.name}" if node.level == 0 else f".{alias.name}"
            if node.level == 0 and f"{module}.{alias.name}" in FORBIDDEN:
                self.flag(node, f"imports {module}.{alias.name}")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        """``f = pickle.loads`` makes ``f`` an alias (the reference itself is flagged too)."""
        target = self.qualname(node.value)
        for t in node.targets:
            if isinstance(t, ast.Name) and target:
                self.names[t.id] = target
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualname(node.func)
        if name is not None:
            self._checked.add(id(node.func))
        kw = {k.arg: k.value for k in node.keywords}
        if name in ("torch.load", "torch.serialization.load"):
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                self.flag(node, f"{name} without weights_only=True")
        elif name == "numpy.load":
            flag = kw.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                self.flag(node, "numpy.load with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.qualname(loader) not in SAFE_YAML_LOADERS:
                self.flag(node, f"{name} without a safe Loader")
        elif name in FORBIDDEN:
            self.flag(node, f"calls {name}")
        elif name is not None and name.split(".")[0] in FORBIDDEN_MODULES:
            self.flag(node, f"uses {name}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._reference(node)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._reference(node)

    def _reference(self, node: ast.AST) -> None:
        """A forbidden function named without being called here (passed on, stored): flag it."""
        if id(node) in self._checked:
            return
        name = self.qualname(node)
        if name in FORBIDDEN or name in ("torch.load", "yaml.load", "yaml.load_all"):
            if not isinstance(getattr(node, "ctx", None), ast.Store):
                self.flag(node, f"references {name}")


def scan_source(text: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """``(line, problem)`` for every unsafe deserialization or eval in ``text``."""
    scanner = _Scanner()
    scanner.visit(ast.parse(text, filename=filename))
    return sorted(set(scanner.problems))


def test_selfcam_sources_never_unpickle_or_eval() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10, f"expected the selfcam sources under {SRC}"
    problems = [f"{f.relative_to(SRC.parent)}:{line}: {what}" for f in files for line, what in scan_source(f.read_text(), str(f))]
    assert not problems, "unsafe deserialization / eval in selfcam:\n" + "\n".join(problems)


FORBIDDEN_SNIPPETS = [
    "import pickle\npickle.load(f)",
    "import pickle\npickle.loads(b)",
    "import pickle\nclass U(pickle.Unpickler): pass",
    "import pickle as p\np.load(f)",
    "from pickle import load\nload(f)",
    "from pickle import loads as l\nl(b)",
    "from pickle import *",
    "import _pickle\n_pickle.loads(b)",
    "import torch\ntorch.load('w.pt')",
    "import torch\ntorch.load('w.pt', weights_only=False)",
    "import torch\ntorch.load('w.pt', **options)",
    "import torch as T\nT.load('w.pt', map_location='cpu')",
    "from torch import load\nload('w.pt')",
    "import torch\nf = torch.load\nf('w.pt', weights_only=True)",
    "import torch.serialization\ntorch.serialization.load('w.pt')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('a.npy', allow_pickle=flag)",
    "from numpy import load\nload('a.npy', allow_pickle=True)",
    "eval('1 + 1')",
    "exec('x = 1')",
    "import builtins\nbuiltins.eval('1')",
    "import yaml\nyaml.load(f)",
    "import yaml\nyaml.load(f, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(f)",
    "from yaml import load\nload(f)",
    "import shelve\nshelve.open('db')",
    "from shelve import open as o",
    "import marshal\nmarshal.loads(b)",
    "import dill",
    "import joblib\njoblib.load('m.pkl')",
    "from joblib import load\nload('m.pkl')",
    "import pickle\ngetattr(pickle, 'loads')(b)",
    "import importlib\nimportlib.import_module('pickle').loads(b)",
    "import pickle\nfns = [pickle.loads]",
]

SAFE_SNIPPETS = [
    "import torch\ntorch.load('w.pt', weights_only=True)",
    "import torch\nmodel.eval()\nmodel.train()",
    "import numpy as np\nnp.load('a.npy')\nnp.load('a.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(f)\nyaml.load(f, Loader=yaml.SafeLoader)",
    "import pickle\npickle.dumps(obj)",
    "from safetensors.torch import load_file\nload_file('w.safetensors')",
    "import json\njson.loads(s)",
    "def load(f):\n    return f.read()\nload(f)",
]


@pytest.mark.parametrize("snippet", FORBIDDEN_SNIPPETS)
def test_scanner_flags_every_forbidden_call(snippet: str) -> None:
    assert scan_source(snippet), f"not flagged:\n{snippet}"


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS)
def test_scanner_passes_safe_code(snippet: str) -> None:
    assert scan_source(snippet) == []
