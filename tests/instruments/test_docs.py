"""The docstring examples of the instruments run (doctest), and every public instrument
function and the Monitor have one, with a torch-style ``Args:`` section."""

import doctest
import importlib
import inspect

import pytest

import gradkit.instruments as instruments

MODULES = ["basic", "collapse", "core", "dashboard", "gradients", "library", "monitor",
           "opposing", "records", "stability"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # nothing an example writes lands in the checkout
    module = importlib.import_module(f"gradkit.instruments.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_batching_statistics_examples_run():
    module = importlib.import_module("gradkit.batching.statistics")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _public():
    for name in instruments.__all__:
        obj = getattr(instruments, name)
        if inspect.isfunction(obj) or name in ("Monitor", "NoiseScaleEMA", "StepContext",
                                                "Instrument"):
            yield name, obj


@pytest.mark.parametrize("name, obj", list(_public()))
def test_public_functions_have_args_and_a_runnable_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert ">>> " in doc, f"{name} has no example"
    params = [p for p in inspect.signature(obj).parameters if p not in ("self",)]
    if params:
        assert "Args:" in doc, f"{name} has no Args section"
        args = doc[doc.index("Args:"):]
        for p in params:
            assert f"{p}:" in args or f"{p}," in args, f"{name}: argument {p} undocumented"


def _instrument_classes():
    from gradkit.instruments import library

    for name in instruments.__all__:
        obj = getattr(instruments, name)
        if inspect.isclass(obj) and obj.__module__ == library.__name__:
            yield name, obj


@pytest.mark.parametrize("name, cls", list(_instrument_classes()))
def test_instrument_classes_document_their_arguments(name, cls):
    doc = inspect.getdoc(cls) or ""
    assert "Args:" in doc, name
    args = doc[doc.index("Args:"):]
    for p in list(inspect.signature(cls).parameters):
        assert f"{p}:" in args, f"{name}: argument {p} undocumented"
