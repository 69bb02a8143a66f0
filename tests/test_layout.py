"""The package's layers (docs/design.md): every module imports only its own layer or lower ones; the public names
resolve; the import paths earlier versions documented still work."""

import ast
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmq"

# lowest first; a module of layer i may import llmq modules of layers 0..i (docs/design.md says why)
LAYERS = [
    ("base", ["llmq._version", "llmq.errors", "llmq.utils"]),
    ("arch", ["llmq.arch"]),
    ("config", ["llmq.config"]),
    ("algorithms", ["llmq.algorithms"]),
    ("io", ["llmq.io"]),
    ("formats", ["llmq.formats"]),
    ("runtime", ["llmq.runtime"]),
    ("job", ["llmq.job"]),
    ("eval", ["llmq.eval"]),
    ("faces", ["llmq.api", "llmq.cli", "llmq.__main__", "llmq"]),
]


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS here and to docs/design.md"
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every llmq module ``path`` imports, at the top or inside a function (relative imports resolved)."""
    return imported_by(path.read_text(), module_name(path), path.name == "__init__.py")


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def imported_by(source: str, mod: str, is_package: bool) -> set[str]:
    package = mod if is_package else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "llmq"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "llmq":
                continue
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names if is_module(f"{name}.{a.name}")}
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_one_way(path):
    mod = module_name(path)
    own = layer_of(mod)
    above = {name: LAYERS[layer_of(name)][0] for name in imported(path) if layer_of(name) > own}
    assert not above, f"{mod} (layer {LAYERS[own][0]}) imports from layers above it: {above}"


def test_the_layer_check_sees_upward_imports_of_every_form():
    """The check itself can fail: relative, absolute, in-function and package-member imports are all seen."""
    source = ("from ..job.pipeline import quantize_layers\nimport llmq.eval.table\n"
              "def f():\n    from llmq.runtime import loader\n")
    names = imported_by(source, "llmq.algorithms.quant", is_package=False)
    assert {"llmq.job.pipeline", "llmq.eval.table", "llmq.runtime.loader"} <= names
    assert all(layer_of(n) > layer_of("llmq.algorithms.quant") for n in names)


def test_the_public_api_resolves():
    import llmq

    for name in llmq.__all__:
        assert getattr(llmq, name) is not None, name
    from llmq.api import perplexity, quantize
    from llmq.runtime.loader import from_pretrained

    assert llmq.quantize is quantize and llmq.perplexity is perplexity and llmq.from_pretrained is from_pretrained
    for fn in (quantize, perplexity, from_pretrained):  # each documents itself with an example
        assert "Example" in fn.__doc__ and "import llmq" in fn.__doc__, fn.__name__


def test_old_import_paths_still_work():
    import llmq
    import llmq.api
    from llmq import QuantConfig, Recipe, from_pretrained  # noqa: F401
    from llmq.config import QuantConfig as Q
    from llmq.config import Recipe as R

    assert QuantConfig is Q and Recipe is R
    assert callable(llmq.api.quantize) and callable(llmq.api.write_quantized)
    assert callable(llmq.api.quantize_to_disk) and callable(llmq.api.save) and callable(llmq.api.plan)


def test_the_old_in_memory_form_of_api_quantize_warns_and_runs_the_job(monkeypatch):
    import llmq.api

    seen = []
    monkeypatch.setattr(llmq.api, "_quantize_in_memory", lambda recipe: seen.append(recipe) or "run")
    recipe = llmq.Recipe.from_dict({"model": "some/model", "bits": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert llmq.api.quantize(recipe) == "run"
    assert seen == [recipe] and any(issubclass(w.category, DeprecationWarning) for w in caught)
