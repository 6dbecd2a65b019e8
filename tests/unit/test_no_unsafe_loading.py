"""S7: no request path deserializes pickles or index files, and user text is never a template.

An AST scan of app/, retrievers/ and selection/ (RELIABILITY.md, "Pickle / FAISS index
deserialization" and "Prompt-template injection"):

* NEVER (anywhere): pickle and its relatives (`_pickle`, `dill`, `cloudpickle`, `joblib`,
  `marshal`, `shelve`, `jsonpickle`, `pandas.read_pickle`, `torch.load`), `numpy.load` with
  `allow_pickle` anything but a literal False, unsafe YAML loading, and the builtins `eval`,
  `exec` and `compile`;
* ONLY IN ALLOWED (function by function, each with the reason it is safe): loaders of files,
  `numpy.load` and FAISS's `read_index` / `deserialize_index`, which must read only files
  the server wrote itself;
* in the modules that turn user text into prompts or records (RENDERING): no `str.format`,
  `format_map`, printf-style `%` on a string, `string.Template` (`substitute`,
  `safe_substitute`) or Jinja; f-strings are fine, as they only insert values.

Names are resolved through each module's imports (`import numpy as np`, `from pickle import
loads as l`), and the scanner is itself tested on small sources holding each pattern.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "retrievers", "selection")
RENDERING = (
    "app/templates.py",
    "app/ingest.py",
    "app/pipeline.py",
    "app/routes/openai_compat.py",
    "app/routes/pools.py",
)

NEVER_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "jsonpickle",
}
NEVER_CALLS = {
    "pandas.read_pickle",
    "torch.load",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "eval",
    "exec",
    "compile",
}
LOADERS = {"numpy.load", "faiss.read_index", "faiss.deserialize_index", "faiss.read_index_binary"}
# (file, function) -> why the files it loads are the server's own.
ALLOWED: dict[tuple[str, str], str] = {
    ("app/vectorfiles.py", "read_vectors"): (
        "loads a pool version's vector file from the data directory; the file was written by "
        "write_vectors (np.save, allow_pickle=False), is named by the version in SQLite, and "
        "its SHA-256 is checked against SQLite before use; loaded with allow_pickle=False"
    ),
}
TEMPLATE_MODULES = {"string.Template", "jinja2"}
TEMPLATE_METHODS = {"format", "format_map", "substitute", "safe_substitute"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    function: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}: {self.what}"


class _Scanner(ast.NodeVisitor):
    def __init__(self, file: str, rendering: bool) -> None:
        self.file = file
        self.rendering = rendering
        self.aliases: dict[str, str] = {}
        self.scope: list[str] = []
        self.findings: list[Finding] = []
        self.loaders: list[tuple[Finding, str]] = []  # (where, loader) for the allow-list

    def _add(self, node: ast.AST, what: str) -> Finding:
        found = Finding(self.file, getattr(node, "lineno", 0), ".".join(self.scope) or "-", what)
        self.findings.append(found)
        return found

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )
            self._check_module(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
            self._check_module(node, f"{module}.{alias.name}")

    def _check_module(self, node: ast.AST, name: str) -> None:
        root = name.split(".")[0]
        if root in NEVER_MODULES:
            self._add(node, f"imports {name}")
        if self.rendering and (name in TEMPLATE_MODULES or root == "jinja2"):
            self._add(node, f"imports {name} in a module that renders user text")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def _dotted(self, node: ast.expr) -> str | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        head = self.aliases.get(node.id, node.id)
        return ".".join([head, *reversed(parts)])

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name is not None:
            root = name.split(".")[0]
            if root in NEVER_MODULES or name in NEVER_CALLS:
                self._add(node, f"calls {name}")
            if name == "numpy.load":
                pickle_off = any(
                    k.arg == "allow_pickle"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is False
                    for k in node.keywords
                )
                if not pickle_off:
                    self._add(node, "calls numpy.load without allow_pickle=False")
            if name in LOADERS:
                where = Finding(self.file, node.lineno, ".".join(self.scope) or "-", name)
                self.loaders.append((where, name))
            if self.rendering and (name in TEMPLATE_MODULES or root == "jinja2"):
                self._add(node, f"calls {name} in a module that renders user text")
        if (
            self.rendering
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in TEMPLATE_METHODS
        ):
            self._add(node, f"calls .{node.func.attr}() in a module that renders user text")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if (
            self.rendering
            and isinstance(node.op, ast.Mod)
            and isinstance(node.left, ast.Constant | ast.JoinedStr)
            and isinstance(getattr(node.left, "value", ""), str)
        ):
            self._add(node, "printf-style % formatting in a module that renders user text")
        self.generic_visit(node)


def scan(source: str, file: str, *, rendering: bool) -> _Scanner:
    scanner = _Scanner(file, rendering)
    scanner.visit(ast.parse(source, filename=file))
    return scanner


def _sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 30, files
    return files


@dataclass(frozen=True)
class ScanResult:
    files: int
    problems: list[str]
    loaders: list[tuple[Finding, str]]


def scan_packages() -> ScanResult:
    """Scan app/, retrievers/ and selection/; the problems found, and every loader call."""
    findings: list[Finding] = []
    loaders: list[tuple[Finding, str]] = []
    files = _sources()
    for path in files:
        file = path.relative_to(ROOT).as_posix()
        scanner = scan(path.read_text(encoding="utf-8"), file, rendering=file in RENDERING)
        findings += scanner.findings
        loaders += scanner.loaders
    outside = [
        f"{where}: {name} outside ALLOWED"
        for where, name in loaders
        if (where.file, where.function) not in ALLOWED
    ]
    return ScanResult(len(files), [str(f) for f in findings] + outside, loaders)


def test_no_unsafe_loading_or_rendering() -> None:
    result = scan_packages()
    assert not result.problems, "\n".join(result.problems)
    # Every allow-list entry still names a loader, so the list cannot rot.
    used = {(where.file, where.function) for where, _ in result.loaders}
    assert set(ALLOWED) <= used, set(ALLOWED) - used
    for file in RENDERING:
        assert (ROOT / file).is_file(), file


BAD_SOURCES = {
    "import pickle\npickle.loads(b)": "pickle",
    "from pickle import loads as l\nl(b)": "pickle",
    "import joblib\njoblib.load(p)": "joblib",
    "import numpy as np\nnp.load(p, allow_pickle=True)": "numpy.load",
    "import numpy as np\nnp.load(p)": "numpy.load",
    "from numpy import load\nload(p, allow_pickle=flag)": "numpy.load",
    "import torch\ntorch.load(f)": "torch.load",
    "import yaml\nyaml.load(s)": "yaml.load",
    "eval(text)": "eval",
    "exec(text)": "exec",
    "import marshal\nmarshal.loads(b)": "marshal",
}
BAD_RENDERING = {
    "def render(t, v):\n    return t.format(**v)": ".format",
    "def render(t, v):\n    return t.format_map(v)": ".format_map",
    "import string\nstring.Template(t).substitute(v)": "string.Template",
    "from string import Template\nTemplate(t).safe_substitute(v)": "string.Template",
    "def render(v):\n    return 'Input: %s' % v": "printf-style",
    "import jinja2\njinja2.Template(t).render()": "jinja2",
}


@pytest.mark.parametrize("source", list(BAD_SOURCES))
def test_scanner_finds_unsafe_loading(source: str) -> None:
    found = scan(source, "x.py", rendering=False).findings
    assert any(BAD_SOURCES[source] in f.what for f in found), found


@pytest.mark.parametrize("source", list(BAD_RENDERING))
def test_scanner_finds_templating_of_user_text(source: str) -> None:
    found = scan(source, "x.py", rendering=True).findings
    assert any(BAD_RENDERING[source] in f.what for f in found), found
    # The same source outside a rendering module is no finding (only loading is global).
    assert not scan(source, "x.py", rendering=False).findings


def test_scanner_flags_loaders_outside_the_allow_list() -> None:
    scanner = scan(
        "import faiss\ndef handler(p):\n    return faiss.read_index(p)\n", "x.py", rendering=False
    )
    assert [(w.function, name) for w, name in scanner.loaders] == [("handler", "faiss.read_index")]
    assert ("x.py", "handler") not in ALLOWED
    safe = scan(
        "import numpy as np\ndef f(p):\n    return np.load(p, allow_pickle=False)\n",
        "x.py",
        rendering=False,
    )
    assert not safe.findings and len(safe.loaders) == 1
