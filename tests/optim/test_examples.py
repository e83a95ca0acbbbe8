"""The runnable example in the docstring of every public optimizer of this group runs and
prints what it shows (so the documentation cannot rot)."""

from __future__ import annotations

import doctest

import pytest

from gradkit.optim import M3, RA3, RM3, SAM, AdaGradNorm, DropMuon, Muon, PerpGrad


@pytest.mark.parametrize("cls", [AdaGradNorm, Muon, DropMuon, SAM, PerpGrad, M3, RM3, RA3],
                         ids=lambda c: c.__name__)
def test_docstring_example(cls):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(cls, cls.__name__, globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 3 and result.failed == 0
