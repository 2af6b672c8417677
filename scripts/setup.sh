#!/usr/bin/env bash
# Installs everything kiln needs on a Debian 12 host: the VMM, the guest kernel, disk
# tools, Go modules. Safe to run again; it only installs what is missing.
set -euo pipefail

need_pkgs=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# chromium: the web console's test drives Debian's headless Chromium (chromedp).
# linux-source-6.1 and its build tools: `kiln assets build` compiles kiln's guest kernel from it
# (cached by its config's hash; security fixes arrive with apt).
for p in qemu-system-x86 linux-image-amd64 linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev e2fsprogs debootstrap xz-utils busybox-static ca-certificates iproute2 nftables postgresql git chromium; do
  have "$p" || need_pkgs+=("$p")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Go: kiln needs the version in go.mod. A Go of 1.21 or newer fetches it by itself
# (GOTOOLCHAIN=auto) from the module proxy; an older or missing Go comes from backports.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
  echo "setup: installing Go from bookworm-backports"
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/kiln-backports.list >/dev/null
    $SUDO apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports golang-go >/dev/null
fi
go version
go mod download

# kiln build --git runs git on the host as this user: a uid of its own, which the
# network's rules hold to the machines' egress policy (no private or metadata address).
if ! getent passwd kiln-git >/dev/null; then
  echo "setup: creating the system user kiln-git"
  $SUDO useradd --system --no-create-home --shell /usr/sbin/nologin kiln-git
fi
