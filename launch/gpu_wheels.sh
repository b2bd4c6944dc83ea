#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for its Python 3.12 (its image has torch with CUDA: never carry torch).
# Run here, in the repository root; .whl/ is git-ignored (.git/info/exclude) and travels with the device tool's
# `carry: [".whl"]`. On the device machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD && python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . \
#     && python3 launch/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64)
# binary wheels, at the versions installed here (the device then runs what CI tests)
for name in zarr numcodecs donfig google-crc32c dask partd locket hydra-core omegaconf pymetis hjson pydantic \
            pydantic-core annotated-types typing-inspection; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: "${PY[@]}" -d .whl "$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")"
done
# sdists built here into pure-Python wheels (deepspeed builds its ops at first use; antlr4 is pure Python)
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")" \
  "antlr4-python3-runtime==4.9.3"
ls -la .whl; du -sh .whl
