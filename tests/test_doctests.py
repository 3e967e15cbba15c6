"""The examples in sgdbreak's docstrings run and print what they show (``doctest``).

The same as ``pytest --doctest-modules sgdbreak``, one test per module, except that a
module whose optional extra is missing is skipped with the extra's name instead of
failing collection.
"""

import doctest
import importlib
import pkgutil

import pytest

import sgdbreak

MODULES = sorted(m.name for m in pkgutil.walk_packages(sgdbreak.__path__, prefix="sgdbreak."))
EXTRAS = {"sgdbreak.integrations.lightning": "lightning"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if name in EXTRAS and f"sgdbreak[{EXTRAS[name]}]" in str(err):
            pytest.skip(f"needs the [{EXTRAS[name]}] extra: {err}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, "".join(report)


def test_the_package_has_docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    examples = sum(len(t.examples) for name in MODULES if name != "sgdbreak.integrations.lightning"
                   for t in finder.find(importlib.import_module(name), name))
    assert examples >= 50
