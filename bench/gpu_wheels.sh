#!/usr/bin/env bash
# The wheels a GPU machine of this workplace lacks (its image has torch, numpy, pillow, pyyaml, tqdm,
# psutil and filelock, but not pydantic, which the run record and the configuration need), downloaded
# here for its Python 3.12 into .whl/ (ignored by git). Carry .whl to that machine; bench/gpu_check.sh
# installs them there into /tmp/site when pydantic is missing. The versions are this install's.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(python3 - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")))
PY
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $versions
ls .whl
