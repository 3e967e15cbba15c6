#!/usr/bin/env bash
# Docs and packaging checks, run by README.md's test command after the tests, in its environment
# (pip install -e ".[ci]"): the documentation site builds without a warning, the wheel and the
# sdist pass `twine check`, and the wheel installs into a clean virtual environment and imports.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { echo "+ $*" >&2; }

step "mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$work/site"

step "python -m build (sdist and wheel)"
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
twine check --strict "$work"/dist/*
python - "$work/dist" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path
dist = Path(sys.argv[1])
wheel, = dist.glob("sgdbreak-*.whl")
names = zipfile.ZipFile(wheel).namelist()
assert "sgdbreak/py.typed" in names, "py.typed missing from the wheel"
assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "recipes/", "docs/"))], names
sdist, = dist.glob("sgdbreak-*.tar.gz")
members = tarfile.open(sdist).getnames()
assert any(m.endswith("sgdbreak/py.typed") for m in members), "py.typed missing from the sdist"
print(f"{wheel.name}: {len(names)} files; {sdist.name}: {len(members)} members")
PY

step "the wheel in a clean virtual environment"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/sgdbreak-*.whl
(cd "$work" && "$work/venv/bin/python" - <<'PY'
import sys
from pathlib import Path
import sgdbreak
home = Path(sgdbreak.__file__).parent
assert str(home).startswith(sys.prefix), f"imported {home}, not the installed wheel"
assert (home / "py.typed").exists()
optional = {"lightning", "pytorch_lightning", "tensorboard", "wandb", "matplotlib", "accelerate"}
assert not optional & set(sys.modules), sorted(optional & set(sys.modules))
for module, extra in (("sgdbreak.integrations.lightning", "lightning"),):
    try:
        __import__(module)
    except ImportError as err:
        assert f"sgdbreak[{extra}]" in str(err), err
    else:
        raise AssertionError(f"{module} imported without its extra")
from sgdbreak.integrations.tensorboard import TensorBoardLogger
try:
    TensorBoardLogger("tb")
except ImportError as err:
    assert "sgdbreak[tensorboard]" in str(err), err
else:
    raise AssertionError("TensorBoardLogger built without tensorboard")
print(f"sgdbreak {sgdbreak.__version__} from {home}: imports, extras refused with their names")
PY
)
"$work/venv/bin/sgdbreak" --help >/dev/null
echo "docs and packaging checks passed" >&2
