#!/usr/bin/env bash
# Builds ferry (release) and installs the binary, its manual page and shell completions.
#   scripts/install.sh [--prefix DIR] [--no-build]
# Default prefix /usr/local: DIR/bin/ferry, DIR/share/man/man1/ferry.1,
# DIR/share/bash-completion/completions/ferry, DIR/share/zsh/site-functions/_ferry,
# DIR/share/fish/vendor_completions.d/ferry.fish. Uninstall by removing those five files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prefix=/usr/local build=1
while (($#)); do
    case "$1" in
    --prefix) prefix="${2:?--prefix needs DIR}" && shift ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2 && exit 2 ;;
    esac
    shift
done

if ((build)); then
    cargo build --release --locked -p ferry
fi
bin=target/release/ferry
[[ -x "$bin" ]] || { echo "install.sh: $bin missing: build it first (without --no-build)" >&2; exit 1; }

install -D -m 0755 "$bin" "$prefix/bin/ferry"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$bin" man >"$tmp/ferry.1"
"$bin" completions bash >"$tmp/ferry.bash"
"$bin" completions zsh >"$tmp/_ferry"
"$bin" completions fish >"$tmp/ferry.fish"
install -D -m 0644 "$tmp/ferry.1" "$prefix/share/man/man1/ferry.1"
install -D -m 0644 "$tmp/ferry.bash" "$prefix/share/bash-completion/completions/ferry"
install -D -m 0644 "$tmp/_ferry" "$prefix/share/zsh/site-functions/_ferry"
install -D -m 0644 "$tmp/ferry.fish" "$prefix/share/fish/vendor_completions.d/ferry.fish"
echo "installed ferry in $prefix (bin, man page, bash/zsh/fish completions)"
