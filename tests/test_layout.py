"""The layout the README promises: the reusable core never imports the book's orchestration, and no module
reaches into another's private names."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llfc_core"
CORE = [p for p in PACKAGE.rglob("*.py") if "book" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]


def imports(path: Path):
    """(module imported, names) for every import statement of a file, relative imports resolved."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    package = package[:-1] if path.name == "__init__.py" else package
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            if path.name == "__init__.py" and node.level:
                base = parts[:-1][: len(parts) - node.level]
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names]


def test_the_core_never_imports_the_book():
    assert len(CORE) >= 15  # the walk found the core modules
    for path in CORE:
        for module, names in imports(path):
            book = module.startswith("llfc_core.book") or (module == "llfc_core" and "book" in names)
            assert not book, f"{path.relative_to(PACKAGE)} imports the book layer ({module} {names})"


def test_no_module_imports_another_modules_private_names():
    for path in PACKAGE.rglob("*.py"):
        for module, names in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not (module.startswith("llfc_core") and private), \
                f"{path.relative_to(PACKAGE)} imports private {private} from {module}"
