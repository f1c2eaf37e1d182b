"""The type stubs and the loader's documentation follow the extension itself (issue 18): every
function and method of `rankfeed._rankfeed` has a stub with its parameters, in its order, of
its kinds, with defaults where it has them; every loader argument is documented."""

import ast
import inspect
import re

import rankfeed
from rankfeed import _rankfeed
from conftest import ROOT

STUB = ROOT / "python" / "rankfeed" / "_rankfeed.pyi"


def stub_defs():
    """{qualified name: ast node} of the stub's functions, methods and properties."""
    tree = ast.parse(STUB.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out[node.name] = node
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = item
    return out


def stub_params(fn, method):
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    params = [(p.arg, "POSITIONAL_OR_KEYWORD", d is not None) for p, d in zip(positional, defaults)]
    params += [(p.arg, "KEYWORD_ONLY", d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append((a.kwarg.arg, "VAR_KEYWORD", False))
    return params[1:] if method else params


def real_params(obj, method):
    params = list(inspect.signature(obj).parameters.values())
    if method:
        params = params[1:]  # self (positional-only in the extension's signatures)
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty) for p in params]


def test_stubs_match_the_extension():
    # Regression: the stub's convert lacked max_line_bytes and convention, and its
    # Dataset.loader listed the arguments in another order than the extension takes them.
    stubs = stub_defs()
    checked = []
    public = [n for n in dir(_rankfeed) if not n.startswith("_")]
    for name in public:
        obj = getattr(_rankfeed, name)
        assert name in stubs, f"{name} has no stub"
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            members = [m for m in vars(obj) if not m.startswith("_") or m in (
                "__len__", "__iter__", "__next__")]
            for m in members:
                qual = f"{name}.{m}"
                assert qual in stubs, f"{qual} has no stub"
                member = vars(obj)[m]
                stub = stubs[qual]
                if type(member).__name__ == "getset_descriptor":
                    assert any(isinstance(d, ast.Name) and d.id == "property"
                               for d in stub.decorator_list), f"{qual} is a property"
                    checked.append(qual)
                    continue
                real = real_params(member, True)
                if qual == "Dataset.loader":
                    # (*, epoch, **options): the stub lists the options, as the one definition
                    # of them (rankfeed::options::Options) has them.
                    assert real == [("epoch", "KEYWORD_ONLY", True), ("options", "VAR_KEYWORD", False)]
                    real = real[:1] + [(o["name"], "KEYWORD_ONLY", True)
                                       for o in _rankfeed.loader_options()]
                assert stub_params(stub, True) == real, qual
                checked.append(qual)
            if obj.__text_signature__:
                assert stub_params(stubs[f"{name}.__init__"], True) == real_params(obj, False)
                checked.append(f"{name}.__init__")
        elif callable(obj) and not inspect.isclass(obj):
            assert stub_params(stubs[name], False) == real_params(obj, False), name
            checked.append(name)
    # Nothing stubbed that the extension lacks.
    for qual in stubs:
        owner, _, member = qual.partition(".")
        assert hasattr(_rankfeed, owner), f"stub {qual}: no such name"
        if member and member != "__init__":
            assert hasattr(getattr(_rankfeed, owner), member), f"stub {qual}: no such member"
    print(f"stubs: {len(checked)} functions, methods and properties match the extension")


def test_loader_documents_every_argument():
    # Regression: Dataset's docstring, the list users read, omitted the embedder mode and its
    # options (sub_batch_size, add_eos).
    doc = rankfeed.Dataset.loader.__doc__
    params = list(inspect.signature(rankfeed.Dataset.loader).parameters)[1:]
    missing = [p for p in params if not re.search(rf"\b{p}\b", doc)]
    assert not missing, f"Dataset.loader's doc does not mention {missing}"
    for mode in ("encoder", "llm", "matryoshka", "embedder"):
        assert f'"{mode}"' in doc
    assert "help(rankfeed.Dataset.loader)" in rankfeed.Dataset.__doc__
    print(f"loader doc: {len(params)} arguments documented")


def test_python_wrappers_take_what_the_extension_takes():
    # rankfeed.convert & co. pass their keyword arguments on: the same names.
    for name in ("convert", "export", "import_parquet", "merge"):
        wrapper = inspect.signature(getattr(rankfeed, name)).parameters
        real = inspect.signature(getattr(_rankfeed, name)).parameters
        assert list(wrapper) == list(real), name


def test_readme_options_table_is_the_generated_one():
    # The README's table of every loader option is tools/options_table.py's output, from the
    # one definition of the options: it cannot drift.
    import importlib.util
    spec = importlib.util.spec_from_file_location("options_table", ROOT / "tools" / "options_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- options:begin -->\n", "<!-- options:end -->"
    held = readme[readme.index(begin) + len(begin):readme.index(end)].strip()
    assert held == mod.table(), "README's options table differs: run python3 tools/options_table.py"
    names = [o["name"] for o in rankfeed.LOADER_OPTIONS]
    assert len(names) == len(set(names)) == len(mod.table().splitlines()) - 2
    print(f"README options table: {len(names)} options, as generated")
