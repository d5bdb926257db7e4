#!/usr/bin/env bash
# Copies the generated CRDs into the OLM bundle.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cp "$here"/../crds/kmm.sigs.x-k8s.io_*.yaml "$here/bundle/manifests/"
echo "CRDs copied into $here/bundle/manifests"
