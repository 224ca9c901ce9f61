# source benchmarks/gpu_env.sh: make `unifattn` importable on a machine where pip cannot
# build (no network): assemble the package layout of pyproject.toml under /tmp/ua_pkg.
rm -rf /tmp/ua_pkg && mkdir -p /tmp/ua_pkg
cp -r unifattn /tmp/ua_pkg/unifattn
cp -r dsl /tmp/ua_pkg/unifattn/dsl
cp -r codegen /tmp/ua_pkg/unifattn/codegen
cp -r kernels /tmp/ua_pkg/unifattn/kernels
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/ua_pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
