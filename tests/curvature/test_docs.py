"""The docstring examples of gradkit.curvature run, and every public operator and algorithm
has one (so the documentation cannot rot)."""

import doctest
import importlib
import inspect

import pytest

import gradkit.curvature as C

MODULES = ["_operator", "operators", "hvp", "lanczos", "trace", "density", "cg"]
RESULTS = {"CGInfo", "EigenInfo", "SpectralDensity", "TraceEstimate", "NondeterministicError"}
ABSTRACT = {"CurvatureOperator"}  # its subclasses carry the examples


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"gradkit.curvature.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", sorted(set(C.__all__) - RESULTS - ABSTRACT))
def test_every_public_operator_and_algorithm_has_an_example_and_args(name):
    doc = inspect.getdoc(getattr(C, name)) or ""
    assert ">>>" in doc
    assert "Args:" in doc
