#!/usr/bin/env bash
# TP's one test command (README, "Set up"); .ci/run runs exactly this.
# Run as root on Debian or Ubuntu, it first installs what the tests use; run as
# anyone else, it names what is missing and how to install it, and stops.
# Then it runs every test with the race detector, from an empty test cache: the
# end-to-end tests build tpd, tp and dlogin themselves, which Go's test cache
# cannot see, so a cached pass could be stale.
#   deploy/test.sh                      # everything, as CI does
#   deploy/test.sh -run TestX ./proxy/  # other arguments replace ./... (still -race)
#   deploy/test.sh -short ./...         # the quick loop: skips what needs root or the tools
#   deploy/test.sh --deps               # only install (or check) what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests run, as "command package" (Debian/Ubuntu package names).
tools=(
	"gcc gcc"                             # go test -race needs cgo
	"/usr/sbin/sshd openssh-server"       # ProxyCommand and tp expose tests run a real sshd
	"ssh openssh-client"                  # … and a real ssh
	"ssh-keygen openssh-client"           # … with throwaway keys
	"chromium chromium"                   # the website test loads a page in headless Chromium
	"certutil libnss3-tools"              # … which trusts TP's CA through NSS's certutil
	"npm npm"                             # TP.js's terminal page: xterm.js from the npm registry (deploy/build-web.sh)
	"node nodejs"                         # TP.js's own tests (clients/web)
	"systemd-analyze systemd"             # deploy/ verifies the systemd unit
	"ip iproute2"                         # tpbench's packet-loss scenarios: a network namespace
	"iptables iptables"                   # … that drops packets
	"ping iputils-ping"                   # docs/IP.md's recipe pings through the tunnel
	"unshare util-linux"                  # the IP tunnel tests (which use ip too) re-run themselves in a network namespace
	"curl curl"                           # the CONNECT tests use Debian's curl as an HTTPS-proxy client
	"git git"                             # … and git, with http.proxySSLCert
	"pg-initdb postgresql"                # internal/testkit/testpg runs a throwaway PostgreSQL (initdb, postgres)
	"tinyproxy tinyproxy"                 # the carrier tests' CONNECT and plain forwarding HTTP proxy
)

# has CMD: whether a tool is there; pg-initdb is Debian's versioned server binary.
has() {
	if [ "$1" = pg-initdb ]; then
		compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
		return
	fi
	command -v "$1" >/dev/null 2>&1
}

missing() {
	local entry cmd pkg
	for entry in "${tools[@]}"; do
		read -r cmd pkg <<<"$entry"
		if ! has "$cmd"; then
			echo "$pkg"
		fi
	done | sort -u
}

if ! command -v go >/dev/null 2>&1; then
	echo "test.sh: go is not on PATH; install Go $(sed -n 's/^go //p' go.mod) (https://go.dev/dl) and run this again." >&2
	exit 1
fi

# A run on a machine this script prepared skips nothing: every tool is there,
# so a skip would be a test that checked nothing while the run looked green.
# -short is the exception: the contributors' quick loop needs only Go (and gcc
# for -race), skips what needs root, sshd, Chromium or PostgreSQL, and the
# summary says which and why.
no_skips=-no-skips
for a in "$@"; do
	case "$a" in -short | -short=true | --short | --short=true) no_skips= ;; esac
done

pkgs=$(missing)
if [ -z "$no_skips" ] && [ "${1:-}" != "--deps" ]; then
	pkgs= # -short: nothing to install
fi
if [ -n "$pkgs" ]; then
	if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "test.sh: installing what the tests need:" $pkgs
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		# The tests make their own PostgreSQL clusters; the package's default
		# cluster (a server on port 5432) is neither needed nor wanted, so it is
		# turned off before the install (postgresql-common's documented switch),
		# and dpkg keeps that file rather than asking about it.
		if grep -qx postgresql <<<"$pkgs" && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
			mkdir -p /etc/postgresql-common
			echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
		fi
		# shellcheck disable=SC2086 # one word per package
		apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $pkgs >/dev/null
		pkgs=$(missing)
	fi
	if [ -n "$pkgs" ]; then
		echo "test.sh: the tests need these packages, which are not installed:" $pkgs >&2
		echo "  On Debian or Ubuntu: sudo apt-get install" $pkgs >&2
		echo "  (or run deploy/test.sh as root, which installs them). No test is skipped for a missing tool: they would fail." >&2
		exit 1
	fi
fi

if [ "${1:-}" = "--deps" ]; then
	echo "test.sh: everything the tests need is installed"
	exit 0
fi

go clean -testcache
if [ $# -eq 0 ]; then
	set -- ./...
fi
report_dir=$(mktemp -d)
trap 'rm -rf "$report_dir"' EXIT
go build -o "$report_dir/testreport" ./internal/testkit/testreport
# The end-to-end package runs real binaries, sshd, Chromium, tinyproxy and
# PostgreSQL: about 5 minutes on 2 quiet cores, 7 loaded. go test's default
# 10-minute bound per package leaves too little room for it on a loaded
# machine, so the bound is 20 minutes: room enough, and a hung test still ends
# the run (with every goroutine's stack and its name) well within CI's 90.
# testreport prints failures, the tests a timeout caught still running, the
# skipped tests with their reasons and the slowest packages.
start=$SECONDS
# TP.js's terminal (WebAssembly and xterm.js), which the end-to-end tests
# serve, is built first, alone: built by their TestMain while other packages'
# tests run, its compile took both cores from tests that time UDP flows.
if [ -n "$no_skips" ]; then
	deploy/build-web.sh
fi
set +e
go test -race -timeout 20m -json "$@" | "$report_dir/testreport" $no_skips
status=("${PIPESTATUS[@]}")
set -e
echo "test.sh: $((SECONDS - start))s"
if [ "${status[0]}" -ne 0 ] || [ "${status[1]}" -ne 0 ]; then
	exit 1
fi
