"""Without the [transformers] extra the integration module imports and the callback names the extra."""

import importlib.util
import sys
from pathlib import Path

import pytest

import sgdbreak


def test_callback_without_transformers_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    path = Path(sgdbreak.__file__).parent / "integrations" / "transformers.py"
    spec = importlib.util.spec_from_file_location("sgdbreak.integrations._transformers_absent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing the module itself works (docs, doctests)
    with pytest.raises(ImportError, match=r"pip install 'sgdbreak\[transformers\]'"):
        module.BreakEvenTrainerCallback()


def test_import_sgdbreak_does_not_import_transformers():
    import subprocess

    code = "import sys, sgdbreak; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
