"""The package is layered: every module imports (at the top or inside a function) only modules of
its own layer or of the layers below it. See README "Architecture"."""

import ast
from pathlib import Path

import fastavatar

ROOT = Path(fastavatar.__file__).parent

# lowest first; the longest matching prefix decides a module's layer
LAYERS = [
    ("fastavatar", 0), ("fastavatar.core", 0),
    ("fastavatar.io", 1), ("fastavatar.config", 1), ("fastavatar.runtime", 1), ("fastavatar.cli", 1),
    ("fastavatar.data", 2), ("fastavatar.flame", 2), ("fastavatar.render", 2), ("fastavatar.face", 2),
    ("fastavatar.models", 3),
    ("fastavatar.io.checkpoints", 4), ("fastavatar.losses", 4),
    ("fastavatar.eval", 5),
    ("fastavatar.train", 6), ("fastavatar.inference", 6), ("fastavatar.animate", 6),
    ("fastavatar.eval.protocol", 7), ("fastavatar.eval.photo_protocol", 7), ("fastavatar.eval.tuning", 7),
    ("fastavatar.apps", 7),
    ("fastavatar.bench", 7), ("fastavatar.loo", 7),
]


def layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def imports_of(path: Path, module: str):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base == "fastavatar":
                for alias in node.names:  # `from fastavatar import losses` imports a module
                    yield f"fastavatar.{alias.name}" if (ROOT / f"{alias.name}.py").exists() or \
                        (ROOT / alias.name).is_dir() else base
            else:
                yield base


def test_every_import_goes_downward():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for target in imports_of(path, module):
            if target.startswith("fastavatar") and layer_of(target) > layer_of(module):
                bad.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)
