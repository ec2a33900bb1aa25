#!/usr/bin/env bash
# Set up everything podflare needs on a fresh Debian 12 machine, idempotently:
# Debian packages, npm packages, the TypeScript build, and the guest image.
# A second run only checks, so it takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs busybox-static cpio gzip util-linux python3 curl)
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "podflare setup needs root (it installs Debian packages and builds a guest image); run it with sudo" >&2
  exit 1
fi

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# The image build downloads the kernel package with apt; it needs package lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  say "installing Debian packages: ${missing[*]:-(refreshing package lists)}"
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

stamp=node_modules/.podflare-lock-hash
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing npm packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

say "building TypeScript"
npm run -s build

say "guest image (cached by content hash)"
node packages/cli/dist/main.js image build
