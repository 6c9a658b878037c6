#!/usr/bin/env bash
# The published API documents against lomo itself, with Python's reference validators:
#   schema   docs/job-spec.schema.json vs every examples/*.yaml and the invalid corpus, each also
#            put to lomo's own validator (job_spec_schema_check.py)
#   openapi  docs/openapi.yaml vs a running lomo-coordinator (openapi_check.py, openapi-core)
#
#   api_documents_test.sh schema|openapi BUILD_DIR PROGRAM SOURCE_DIR
#     PROGRAM: lomoctl (schema) or lomo-coordinator (openapi)
#
# The packages (tests/api/requirements.txt) go into BUILD_DIR/api-venv, created on the first run
# and reused while the requirements file is unchanged; a lock serialises the two tests' setup.
# Exit status: 0 passed, 1 failed, 77 skipped (ctest's SKIP_RETURN_CODE) only when the package
# index cannot be reached and no complete environment exists; the reason is printed.
set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: $0 schema|openapi BUILD_DIR PROGRAM SOURCE_DIR" >&2
  exit 2
fi
mode=$1
build_dir=$(cd "$2" && pwd)
program=$3
source_dir=$(cd "$4" && pwd)
requirements="$source_dir/tests/api/requirements.txt"
venv="$build_dir/api-venv"
digest=$(sha256sum "$requirements" | cut -c1-16)

# The index pip would use (pip.conf or PIP_INDEX_URL), reachable within 20 s?
index_reachable() {
  python3 - <<'PY'
import os, subprocess, sys, urllib.request
url = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                     capture_output=True, text=True).stdout.strip()
url = os.environ.get("PIP_INDEX_URL") or url or "https://pypi.org/simple/"
try:
    urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=20).read(1)
except Exception as error:  # any failure to reach it is the reason to skip
    print(f"{url}: {error}")
    sys.exit(1)
PY
}

exec 9>"$venv.lock"
flock 9
if [[ "$(cat "$venv/.complete" 2>/dev/null)" != "$digest" ]]; then
  if ! reason=$(index_reachable); then
    echo "SKIPPED: the Python package index cannot be reached ($reason), and $venv has no" \
         "complete environment for $requirements"
    exit 77
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$digest" > "$venv/.complete"
fi
flock -u 9

case "$mode" in
  schema) exec "$venv/bin/python3" "$source_dir/tests/api/job_spec_schema_check.py" "$program" \
               "$source_dir" ;;
  openapi) exec "$venv/bin/python3" "$source_dir/tests/api/openapi_check.py" "$program" \
                "$source_dir" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
