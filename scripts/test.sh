#!/usr/bin/env bash
# Set everything up, then run every test: lint, unit tests (TypeScript, the Python agent
# and the Python SDK), and end-to-end tests that boot real VMs (TCG on hosts without usable KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "==> lint" >&2
npx biome check --diagnostic-level=error .

echo "==> guest agent unit tests (Python)" >&2
(cd guest/agent && python3 -m unittest discover -s tests)

echo "==> Python SDK unit tests" >&2
(cd python && python3 -m unittest discover -s tests)

echo "==> TypeScript unit tests" >&2
npm run -s test:unit

echo "==> end-to-end tests (real VMs)" >&2
# Two files at a time; the guest-abuse file (it asserts a 1 s ping bound) then runs alone,
# so its figures are not those of a host shared with another test file's VMs.
npm run -s test:e2e
