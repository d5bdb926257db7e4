#!/usr/bin/env bash
# Real-kernel tests of kmm-worker: builds a static kmm-worker, our test modules (against
# Debian's linux-headers for the installed linux-image) and an initramfs, then boots Debian's
# kernel in QEMU (TCG only: /dev/kvm on these machines hangs) and runs the scenarios of
# tests/kernel/init.sh inside it. Two boots run in parallel: `main`, and `sigenforce` with
# module.sig_enforce=1 on the kernel command line.
#
# Prints `PASS <scenario>` / `FAIL <scenario>: <why>` per scenario and a last line
# `N passed, M failed`; exits non-zero on any failure or when nothing ran. Never loads a
# module on the host. Build products are cached under target/kernel-e2e and reused while
# their inputs are unchanged.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=$ROOT/target/kernel-e2e
PACKAGES=(qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static kmod cpio
	openssl gcc make binutils xz-utils zstd perl)
MAIN_SCENARIOS=(invalid-config module-not-found load-with-dependencies module-in-use
	unload-in-reverse-order parameters-and-args invalid-parameter raw-args in-tree-removal
	firmware-missing firmware unknown-symbol invalid-module-format-truncated
	invalid-module-format-vermagic not-loaded-after-modprobe)
SIGENFORCE_SCENARIOS=(signature-unsigned-rejected signature-unknown-key-rejected
	signature-trusted-loads)
QEMU_TIMEOUT=${KERNEL_E2E_QEMU_TIMEOUT:-300}

STARTED=$(date +%s.%N)
stage="start"
summarised=0
# Any unexpected exit (a failed build step, a missing tool) still ends with the summary line.
on_exit() {
	local rc=$?
	if [ "$summarised" = 0 ]; then
		echo "FAIL setup: stage '$stage' failed (exit $rc)"
		echo "0 passed, 1 failed"
		[ "$rc" != 0 ] || rc=1
	fi
	exit "$rc"
}
trap on_exit EXIT

say() { echo "kernel-e2e: $*" >&2; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
stage="waiting for another run.sh (lock $CACHE/lock)"
flock -w 900 9

# --- 1. Debian packages ----------------------------------------------------------------------
stage="installing Debian packages"
missing=()
for package in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
		missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
	say "installing ${missing[*]}"
	[ "$(id -u)" = 0 ] || { say "need root to install: ${missing[*]}"; exit 1; }
	timeout 600 apt-get update -q >&2
	DEBIAN_FRONTEND=noninteractive timeout 1200 \
		apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# The newest installed kernel that has both an image and headers; never a hard-coded version.
stage="finding the kernel"
KVER=
for candidate in $(ls /lib/modules | sort -V -r); do
	if [ -f "/boot/vmlinuz-$candidate" ] && [ -d "/lib/modules/$candidate/build" ]; then
		KVER=$candidate
		break
	fi
done
[ -n "$KVER" ] || { say "no kernel with both /boot/vmlinuz-* and headers under /lib/modules"; exit 1; }
say "kernel $KVER"

# --- 2. static kmm-worker --------------------------------------------------------------------
stage="building the static kmm-worker"
cd "$ROOT"
if [ -d "$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-musl" ]; then
	TARGET=x86_64-unknown-linux-musl
	FLAGS='-C strip=symbols'
else
	TARGET=x86_64-unknown-linux-gnu
	FLAGS='-C target-feature=+crt-static -C strip=symbols'
fi
RUSTFLAGS=$FLAGS timeout 1800 cargo build --release -q -p kmm-worker --target "$TARGET"
WORKER=$ROOT/target/$TARGET/release/kmm-worker
dynamic=$(readelf -d -l "$WORKER")
if grep -q -e NEEDED -e 'program interpreter' <<<"$dynamic"; then
	say "$WORKER is not statically linked"
	exit 1
fi
say "kmm-worker: $TARGET static, $(stat -c %s "$WORKER") bytes"

# --- 3. test modules, signed copy ------------------------------------------------------------
stage="building the test modules"
MODULES=$CACHE/modules-$KVER
modules_key=$(hash_of "$HERE"/modules/* <(echo "$KVER"))
if [ "$(cat "$MODULES/key" 2>/dev/null)" != "$modules_key" ]; then
	rm -rf "$MODULES"
	mkdir -p "$MODULES/src"
	cp "$HERE"/modules/* "$MODULES/src/"
	started=$(date +%s.%N)
	if ! timeout 600 make -C "/lib/modules/$KVER/build" M="$MODULES/src" modules \
		>"$MODULES/build.log" 2>&1; then
		cat "$MODULES/build.log" >&2
		exit 1
	fi
	say "built the test modules in $(elapsed "$started" "$(date +%s.%N)") s"

	stage="signing a copy of kmm_ci_param"
	SIGN_FILE=/lib/modules/$KVER/build/scripts/sign-file
	[ -x "$SIGN_FILE" ] || SIGN_FILE=$(ls /usr/lib/linux-kbuild-*/scripts/sign-file | sort -V | tail -1)
	timeout 120 openssl req -new -x509 -nodes -utf8 -sha256 -days 36500 -batch \
		-newkey rsa:2048 -subj "/CN=kmm-rs kernel-e2e test key" \
		-outform DER -out "$MODULES/signing_key.x509" -keyout "$MODULES/signing_key.pem" 2>/dev/null
	cp "$MODULES/src/kmm_ci_param.ko" "$MODULES/kmm_ci_param.signed.ko"
	"$SIGN_FILE" sha256 "$MODULES/signing_key.pem" "$MODULES/signing_key.x509" \
		"$MODULES/kmm_ci_param.signed.ko"
	signer=$(modinfo -F signer "$MODULES/kmm_ci_param.signed.ko")
	[ "$signer" = "kmm-rs kernel-e2e test key" ] || { say "signing failed: signer '$signer'"; exit 1; }
	echo "$modules_key" >"$MODULES/key"
fi

# --- 4. initramfs ----------------------------------------------------------------------------
stage="building the initramfs"
KMOD=$(readlink -f "$(command -v kmod || echo /bin/kmod)")
BUSYBOX=/bin/busybox
INITRD=$CACHE/initrd-$KVER.cpio.gz
initrd_key=$(hash_of "$MODULES/key" "$WORKER" "$HERE/init.sh" "$HERE/run.sh" "$KMOD" "$BUSYBOX")
if [ "$(cat "$INITRD.key" 2>/dev/null)" != "$initrd_key" ]; then
	started=$(date +%s.%N)
	R=$CACHE/initramfs
	rm -rf "$R"
	mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,usr/local/bin}
	install -m 0755 "$HERE/init.sh" "$R/init"
	install -m 0755 "$WORKER" "$R/usr/local/bin/kmm-worker"
	mknod "$R/dev/console" c 5 1

	# busybox for the shell and tools; kmod (dynamic: Debian has no static kmod) with its
	# libraries for modprobe and friends.
	cp "$BUSYBOX" "$R/bin/busybox"
	for applet in $("$BUSYBOX" --list); do
		case "$applet" in
		busybox | modprobe | insmod | rmmod | lsmod | depmod | modinfo) ;;
		*) ln -s busybox "$R/bin/$applet" ;;
		esac
	done
	cp "$KMOD" "$R/sbin/kmod"
	for tool in modprobe insmod rmmod lsmod depmod modinfo; do ln -s kmod "$R/sbin/$tool"; done
	for lib in $(ldd "$KMOD" | grep -o '/[^ ]*'); do cp -L --parents "$lib" "$R"; done

	# The node's own modules: Debian's dummy and ifb, compressed as distributions ship them.
	HOSTMODS=$R/lib/modules/$KVER
	mkdir -p "$HOSTMODS/kernel/drivers/net"
	cp /lib/modules/"$KVER"/modules.builtin* /lib/modules/"$KVER"/modules.order "$HOSTMODS/"
	xz --check=crc32 -c "/lib/modules/$KVER/kernel/drivers/net/dummy.ko" \
		>"$HOSTMODS/kernel/drivers/net/dummy.ko.xz"
	zstd -q -c "/lib/modules/$KVER/kernel/drivers/net/ifb.ko" \
		>"$HOSTMODS/kernel/drivers/net/ifb.ko.zst"
	depmod -b "$R" "$KVER" 2>>"$CACHE/depmod.log"

	# Module images, laid out as kmod images are: <dirName>/lib/modules/<kernel>/ + depmod.
	image() { # name dirName files...
		local dir=$R/images/$1$2
		shift 2
		mkdir -p "$dir/lib/modules/$KVER"
		cp "$@" "$dir/lib/modules/$KVER/"
		depmod -b "$dir" "$KVER" 2>>"$CACHE/depmod.log"
	}
	image main /opt "$MODULES"/src/*.ko
	mkdir -p "$R/images/main/firmware/sub"
	awk 'BEGIN { for (i = 0; i < 3000; i++) printf "%c", 65 + i % 26 }' \
		>"$R/images/main/firmware/kmm_ci_fw.bin"
	echo "extra firmware file" >"$R/images/main/firmware/sub/extra.bin"
	image nodep /opt "$MODULES/src/kmm_ci_consumer.ko"
	image broken /broken "$MODULES/src/kmm_ci_param.ko"
	# Corrupt after depmod: cut the module in half (its section headers are at the end).
	broken=$R/images/broken/broken/lib/modules/$KVER/kmm_ci_param.ko
	head -c "$(($(stat -c %s "$broken") / 2))" "$MODULES/src/kmm_ci_param.ko" >"$broken"
	# Another kernel's vermagic, same length so the ELF layout is unchanged. With modversions
	# the kernel compares only the flags after the release, so those change too.
	image vermagic /opt "$MODULES/src/kmm_ci_param.ko"
	KVER=$KVER perl -0777 -pi -e \
		's/vermagic=\Q$ENV{KVER}\E SMP preempt /"vermagic=" . ("9" x length $ENV{KVER}) . " SMP dynamic "/e' \
		"$R/images/vermagic/opt/lib/modules/$KVER/kmm_ci_param.ko"
	cmp -s "$MODULES/src/kmm_ci_param.ko" "$R/images/vermagic/opt/lib/modules/$KVER/kmm_ci_param.ko" &&
		{ say "could not change the vermagic of kmm_ci_param.ko"; exit 1; }
	image signed /opt "$MODULES/kmm_ci_param.signed.ko"
	mv "$R/images/signed/opt/lib/modules/$KVER/kmm_ci_param.signed.ko" \
		"$R/images/signed/opt/lib/modules/$KVER/kmm_ci_param.ko"
	depmod -b "$R/images/signed/opt" "$KVER" 2>>"$CACHE/depmod.log"
	image debian /opt "/lib/modules/$KVER/kernel/drivers/net/dummy.ko"

	(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
		gzip -1 >"$INITRD.tmp"
	mv "$INITRD.tmp" "$INITRD"
	echo "$initrd_key" >"$INITRD.key"
	say "initramfs $(stat -c %s "$INITRD") bytes in $(elapsed "$started" "$(date +%s.%N)") s"
fi

# --- 5. boot -------------------------------------------------------------------------------
stage="booting QEMU"
# boot <suite> <extra kernel arguments>: writes <suite>.log, <suite>.rc and <suite>.seconds.
boot() {
	local suite=$1 extra=$2 started rc=0
	started=$(date +%s.%N)
	timeout "$QEMU_TIMEOUT" qemu-system-x86_64 -accel tcg -m 512 -smp 1 \
		-nodefaults -no-user-config -display none -no-reboot \
		-kernel "/boot/vmlinuz-$KVER" -initrd "$INITRD" \
		-append "console=ttyS0 panic=-1 quiet kmm.suite=$suite $extra" \
		-serial "file:$CACHE/$suite.log" \
		-device isa-debug-exit,iobase=0xf4,iosize=0x04 \
		</dev/null >"$CACHE/$suite.qemu.log" 2>&1 || rc=$?
	echo "$rc" >"$CACHE/$suite.rc"
	elapsed "$started" "$(date +%s.%N)" >"$CACHE/$suite.seconds"
}
rm -f "$CACHE"/{main,sigenforce}.{log,rc,seconds}
boot main "" &
main_pid=$!
boot sigenforce "module.sig_enforce=1" &
sig_pid=$!
wait "$main_pid" "$sig_pid"

# --- 6. results ----------------------------------------------------------------------------
stage="reading results"
passed=0
failed=0
report() { # suite scenario...
	local suite=$1 log=$CACHE/$1.log rc seconds line name uptime
	shift
	rc=$(cat "$CACHE/$suite.rc")
	seconds=$(cat "$CACHE/$suite.seconds")
	tr -d '\r' <"$log" >"$log.txt"
	uptime=$(sed -n 's/^KMMTEST DONE .*uptime=//p' "$log.txt")
	say "boot $suite: ${seconds} s from QEMU start to result, guest uptime ${uptime:-?} s (QEMU exit $rc; log $log.txt)"
	for name in "$@"; do
		line=$(grep -a -E "^KMMTEST (PASS|FAIL) $name(:|\$)" "$log.txt" | head -1 || true)
		case "$line" in
		"KMMTEST PASS $name")
			echo "PASS $name"
			passed=$((passed + 1))
			;;
		"KMMTEST FAIL $name:"*)
			echo "FAIL ${line#KMMTEST FAIL }"
			failed=$((failed + 1))
			;;
		*)
			echo "FAIL $name: no result from the guest (boot $suite, QEMU exit $rc; see $log.txt)"
			failed=$((failed + 1))
			;;
		esac
	done
	# isa-debug-exit: 1 = init wrote 0 (all passed), 3 = init wrote 1; anything else (0 after a
	# panic or poweroff, 124 on timeout) means the guest never reported.
	if ! grep -q '^KMMTEST DONE' "$log.txt" || { [ "$rc" != 1 ] && [ "$rc" != 3 ]; }; then
		echo "FAIL boot-$suite: the guest did not finish (QEMU exit $rc); last lines:"
		tail -n 15 "$log.txt" | sed 's/^/    /'
		failed=$((failed + 1))
	fi
	grep -a '^KMMTEST REASON' "$log.txt" | sed 's/^KMMTEST REASON /kernel-e2e: observed /' >&2 || true
}
report main "${MAIN_SCENARIOS[@]}"
report sigenforce "${SIGENFORCE_SCENARIOS[@]}"

say "total $(elapsed "$STARTED" "$(date +%s.%N)") s"
summarised=1
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
