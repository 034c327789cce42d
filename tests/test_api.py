"""The public surface: exports, docstrings, documented arguments, doctests,
and no dependence on JAX internals."""

import doctest
import importlib
import inspect
import os
import pkgutil
import re

import pytest

import lora_jax as lj

PKG_DIR = os.path.dirname(lj.__file__)


def _modules():
    names = ["lora_jax"]
    for info in pkgutil.walk_packages([PKG_DIR], prefix="lora_jax."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def _public_callables():
    out = []
    for name in lj.__all__:
        obj = getattr(lj, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out.append((name, obj))
    return out


def test_all_is_consistent():
    assert len(set(lj.__all__)) == len(lj.__all__)
    for name in lj.__all__:
        assert hasattr(lj, name), name
    assert lj.__version__


@pytest.mark.parametrize("name,obj", _public_callables(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_public_names_have_examples(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, f"lj.{name} has no docstring"
    if inspect.isfunction(obj):   # every public function shows an example
        assert ">>>" in doc, f"lj.{name}'s docstring has no example"


def _documented_args(doc: str):
    m = re.search(r"^(Args|Arguments):\n(.*?)(?:\n\S|\Z)", doc, re.S | re.M)
    if not m:
        return None
    names = []
    for line in m.group(2).splitlines():
        hit = re.match(r"^  (\*{0,2}\w+)(?: \(.*?\))?:", line)
        if hit:
            names.append(hit.group(1).lstrip("*"))
    return names


@pytest.mark.parametrize("name,obj", _public_callables(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_documented_args_match_signature(name, obj):
    doc = inspect.getdoc(obj) or ""
    documented = _documented_args(doc)
    if documented is None:
        return
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    params = [p for p in sig.parameters if p not in ("self", "cls")]
    for d in documented:
        assert d in params, f"lj.{name} documents argument {d!r} that its signature lacks: {params}"
    for p in params:
        kind = sig.parameters[p].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        assert p in documented, f"lj.{name} does not document argument {p!r}"


@pytest.mark.parametrize("modname", _modules())
@pytest.mark.standard_promotion   # examples show user code: optax's adam needs it
def test_doctests(modname):
    mod = importlib.import_module(modname)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                          verbose=False)
    assert res.failed == 0, f"{res.failed} doctest(s) failed in {modname}"


def test_no_jax_internals():
    offenders = []
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                if re.search(r"jax\._src|from jax import _src", text):
                    offenders.append(os.path.relpath(path, PKG_DIR))
    assert not offenders, f"lora_jax must use public JAX only; jax._src appears in {offenders}"


DEPRECATED = {"Checkpointer.inspect"}   # old signatures kept for one release


def test_options_are_keyword_only():
    """Every public function's optional arguments are keyword-only."""
    from lora_jax import interop, plot
    offenders = []
    for mod, names in ((lj, lj.__all__), (plot, plot.__all__), (interop, interop.__all__)):
        for name in names:
            obj = getattr(mod, name)
            funcs = [(name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                funcs = [(f"{name}.{m}", f) for m, f in vars(obj).items()
                         if inspect.isfunction(f) and not m.startswith("_")]
            for fname, f in funcs:
                if fname in DEPRECATED:
                    continue
                for p in inspect.signature(f).parameters.values():
                    if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty:
                        offenders.append(f"{fname}({p.name}=...)")
    assert not offenders, offenders


def test_all_is_sorted_and_strict_error_is_public():
    assert list(lj.__all__) == sorted(lj.__all__, key=str.lower)
    assert issubclass(lj.StrictError, ValueError)
    from importlib import metadata
    assert lj.__version__ == metadata.version("lora-jax")


def test_inspect_is_a_deprecated_alias(tmp_path):
    import jax
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    cfg = lj.LoraConfig(rank=2, targets="w")
    lj.save(tmp_path, lj.init(params, cfg, key=jax.random.key(1)), cfg)
    with pytest.warns(DeprecationWarning, match="lj.checkpoint_info"):
        info = lj.inspect(tmp_path)
    assert info.step == lj.checkpoint_info(tmp_path).step == 0
    with lj.Checkpointer(tmp_path, read_only=True) as ck, \
            pytest.warns(DeprecationWarning, match=r"Checkpointer.info\(step=...\)"):
        assert ck.inspect().step == 0
