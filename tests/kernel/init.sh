#!/bin/sh
# PID 1 of the kmm-worker test VM (busybox sh). Runs the scenarios of one suite (kernel command
# line `kmm.suite=main|sigenforce`) the way a worker pod would: the "image" is extracted into
# /tmp like the image-extractor init container does, the config is written to
# /etc/kmm-worker/config.yaml, and kmm-worker runs with the Go worker's command line.
# Every scenario checks the kernel's own view (/proc/modules, /sys/module, kernel log) besides
# the worker's exit status and termination message.
# Output protocol (read by run.sh): `KMMTEST PASS <name>`, `KMMTEST FAIL <name>: <why>`,
# `KMMTEST REASON <name> <termination message>`, then `KMMTEST DONE`; the result also leaves
# through isa-debug-exit (0 = all passed).

# Debian's busybox runs its own applets before searching PATH; kmod's tools are called as
# /sbin/<tool> here (kmm-worker finds /sbin/modprobe through PATH).
export PATH=/sbin:/bin:/usr/local/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /etc/kmm-worker /etc/modprobe.d /var/lib/firmware
mount -t tmpfs tmpfs /tmp

KVER=$(uname -r)
SUITE=$(sed -n 's/.*kmm\.suite=\([a-z]*\).*/\1/p' /proc/cmdline)
CONFIG=/etc/kmm-worker/config.yaml
TERMLOG=/dev/termination-log
FAILED=0
echo "KMMTEST START suite=$SUITE kernel=$KVER sig_enforce=$(cat /sys/module/module/parameters/sig_enforce)"

# --- helpers -------------------------------------------------------------------------------

scenario() {
	NAME=$1
	FAILS=
	echo "=== scenario $NAME"
	dmesg -c >/dev/null
}

fail() { FAILS="$FAILS; $*"; }

# Prints the scenario's result; finish also cleans up, report leaves the state to the next one.
report() {
	if [ -z "$FAILS" ]; then
		echo "KMMTEST PASS $NAME"
	else
		echo "KMMTEST FAIL $NAME: ${FAILS#; }"
		FAILED=1
	fi
}

finish() {
	report
	cleanup
}

# Leaves the kernel and the filesystem as they were before the scenario.
cleanup() {
	for m in kmm_ci_consumer kmm_ci_fw kmm_ci_param kmm_ci_provider dummy ifb; do
		if grep -q "^$m " /proc/modules; then /sbin/rmmod "$m"; fi
	done
	rm -rf /tmp/* /etc/modprobe.d/* /var/lib/firmware/*
}

# The image-extractor init container: copy <dirName>/lib/modules/<kernel> (and the firmware
# directory, if any) of image $1 into /tmp.
extract() {
	image=$1 dir=$2 firmware=$3
	mkdir -p "/tmp$dir/lib/modules"
	cp -R "/images/$image$dir/lib/modules/$KVER" "/tmp$dir/lib/modules"
	if [ -n "$firmware" ]; then
		mkdir -p "/tmp$firmware"
		cp -R "/images/$image$firmware/"* "/tmp$firmware"
	fi
}

# Writes the worker config: the common keys, then the YAML given on stdin.
config() {
	{
		echo "kernelVersion: $KVER"
		echo "containerImage: registry.example/kmm/kmm-ci:$KVER"
		echo "insecurePull: false"
		cat
	} >"$CONFIG"
}

# Runs kmm-worker; sets RC and TERM_MSG, shows the worker's log indented.
worker() {
	rm -f "$TERMLOG"
	kmm-worker "$@" >/tmp/worker.log 2>&1
	RC=$?
	sed 's/^/    | /' /tmp/worker.log
	TERM_MSG=$(cat "$TERMLOG" 2>/dev/null)
	echo "    worker $* -> exit $RC${TERM_MSG:+, termination message: $TERM_MSG}"
}

expect_success() {
	[ "$RC" = 0 ] || fail "worker failed (exit $RC): $TERM_MSG"
}

# expect_failure <Reason> <fragment of the kernel's or modprobe's message>
expect_failure() {
	echo "KMMTEST REASON $NAME $TERM_MSG"
	[ "$RC" != 0 ] || fail "worker exited 0, want $1"
	case "$TERM_MSG" in
	"$1: "*"$2"*) ;;
	*) fail "termination message '$TERM_MSG', want '$1: ...$2...'" ;;
	esac
}

in_kernel() { grep -q "^$1 " /proc/modules && [ -d "/sys/module/$1" ]; }

expect_loaded() {
	for m in "$@"; do in_kernel "$m" || fail "$m is not in /proc/modules and /sys/module"; done
}

expect_absent() {
	for m in "$@"; do
		! grep -q "^$m " /proc/modules || fail "$m is still in /proc/modules"
		[ ! -d "/sys/module/$m" ] || fail "/sys/module/$m still exists"
	done
}

expect_file() {
	[ "$(cat "$1" 2>/dev/null)" = "$2" ] || fail "$1 is '$(cat "$1" 2>&1)', want '$2'"
}

# The order in which our modules logged "<event>" (loaded|unloaded) since the scenario began.
kernel_order() {
	dmesg | sed -n "s/.*\(kmm_ci_[a-z]*\): $1.*/\1/p" | tr '\n' ' '
}

expect_order() {
	got=$(kernel_order "$1")
	[ "$got" = "$2 " ] || fail "kernel log $1 order '$got', want '$2'"
}

# --- suite main -----------------------------------------------------------------------------

scenario_invalid_config() {
	scenario invalid-config
	extract main /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
		  moduleNmae: typo
	EOF
	worker kmod load "$CONFIG"
	expect_failure InvalidConfig moduleNmae
	expect_absent kmm_ci_param
	finish
}

scenario_module_not_found() {
	scenario module-not-found
	extract main /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_nope
	EOF
	worker kmod load "$CONFIG"
	expect_failure ModuleNotFound "kmm_ci_nope not found"
	finish
}

# Loading order through the softdep file (what the operator mounts at
# /etc/modprobe.d/softdep.conf), plus a hard dependency resolved by modules.dep.
LOAD_ORDER_CONFIG='modprobe:
  moduleName: kmm_ci_consumer
  modulesLoadingOrder: [kmm_ci_consumer, kmm_ci_param]'

scenario_load_order() {
	scenario load-with-dependencies
	extract main /opt
	echo "softdep kmm_ci_consumer pre: kmm_ci_param" >/etc/modprobe.d/softdep.conf
	echo "$LOAD_ORDER_CONFIG" | config
	worker kmod load "$CONFIG"
	expect_success
	expect_loaded kmm_ci_consumer kmm_ci_provider kmm_ci_param
	[ -e /sys/module/kmm_ci_provider/holders/kmm_ci_consumer ] ||
		fail "kmm_ci_provider is not held by kmm_ci_consumer"
	expect_order loaded "kmm_ci_provider kmm_ci_param kmm_ci_consumer"
	report

	# Unloading only the provider must fail while the consumer uses it.
	scenario module-in-use
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_provider
	EOF
	worker kmod unload "$CONFIG"
	expect_failure ModuleInUse "kmm_ci_provider is in use"
	expect_loaded kmm_ci_provider kmm_ci_consumer
	expect_file /sys/module/kmm_ci_provider/refcnt 1
	report

	scenario unload-in-reverse-order
	echo "$LOAD_ORDER_CONFIG" | config
	worker kmod unload "$CONFIG"
	expect_success
	expect_absent kmm_ci_consumer kmm_ci_provider kmm_ci_param
	expect_order unloaded "kmm_ci_consumer kmm_ci_provider kmm_ci_param"
	finish
}

scenario_parameters() {
	scenario parameters-and-args
	extract main /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
		  parameters: [level=7, greeting=hello-kmm]
		  args: {load: [--first-time], unload: [--first-time]}
	EOF
	worker kmod load "$CONFIG"
	expect_success
	expect_loaded kmm_ci_param
	expect_file /sys/module/kmm_ci_param/parameters/level 7
	expect_file /sys/module/kmm_ci_param/parameters/greeting hello-kmm
	grep -q 'modprobe -vd /tmp/opt --first-time kmm_ci_param level=7 greeting=hello-kmm' /tmp/worker.log ||
		fail "load command line not in the worker log"
	worker kmod unload "$CONFIG"
	expect_success
	expect_absent kmm_ci_param
	finish
}

# The kernel ignores unknown parameters but refuses a value it cannot parse.
scenario_invalid_parameter() {
	scenario invalid-parameter
	extract main /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
		  parameters: [bogus=1, level=abc]
	EOF
	worker kmod load "$CONFIG"
	expect_failure InvalidParameter "\`abc' invalid for parameter \`level'"
	grep -q "unknown parameter 'bogus' ignored" /tmp/worker.log ||
		fail "the kernel's note about the ignored parameter is not in the worker log"
	expect_absent kmm_ci_param
	finish
}

scenario_raw_args() {
	scenario raw-args
	extract main /opt
	config <<-EOF
		modprobe:
		  rawArgs:
		    load: [-v, -d, /tmp/opt, kmm_ci_param, level=3]
		    unload: [-r, -v, -d, /tmp/opt, kmm_ci_param]
	EOF
	worker kmod load "$CONFIG"
	expect_success
	expect_loaded kmm_ci_param
	expect_file /sys/module/kmm_ci_param/parameters/level 3
	worker kmod unload "$CONFIG"
	expect_success
	expect_absent kmm_ci_param
	finish
}

# dummy.ko.xz and ifb.ko.zst are Debian's own modules under /lib/modules/<kernel>.
scenario_in_tree_removal() {
	scenario in-tree-removal
	extract main /opt
	/sbin/modprobe dummy && /sbin/modprobe ifb || fail "could not load the in-tree modules first"
	expect_loaded dummy ifb
	config <<-EOF
		inTreeModulesToRemove: [dummy, ifb, kmm_not_on_this_host]
		modprobe:
		  moduleName: kmm_ci_param
	EOF
	worker kmod load "$CONFIG"
	expect_success
	expect_absent dummy ifb
	expect_loaded kmm_ci_param
	grep -q 'running: modprobe -rv dummy ifb$' /tmp/worker.log ||
		fail "in-tree removal was not 'modprobe -rv dummy ifb'"
	finish
}

scenario_firmware_missing() {
	scenario firmware-missing
	extract main /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_fw
	EOF
	worker kmod load "$CONFIG"
	expect_failure FirmwareMissing "kmm_ci_fw.bin"
	expect_absent kmm_ci_fw
	finish
}

scenario_firmware() {
	scenario firmware
	extract main /opt /firmware
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_fw
		  firmwarePath: /firmware
	EOF
	worker kmod load "$CONFIG" --firmware-path /var/lib/firmware
	expect_success
	expect_loaded kmm_ci_fw
	expect_file /sys/module/firmware_class/parameters/path /var/lib/firmware
	cmp -s /tmp/firmware/kmm_ci_fw.bin /var/lib/firmware/kmm_ci_fw.bin || fail "kmm_ci_fw.bin not copied"
	cmp -s /tmp/firmware/sub/extra.bin /var/lib/firmware/sub/extra.bin || fail "sub/extra.bin not copied"
	expect_file /sys/module/kmm_ci_fw/parameters/fw_size "$(wc -c </tmp/firmware/kmm_ci_fw.bin)"
	worker kmod unload "$CONFIG" --firmware-path /var/lib/firmware
	expect_success
	expect_absent kmm_ci_fw
	[ -z "$(ls -A /var/lib/firmware)" ] || fail "firmware left behind: $(ls -A /var/lib/firmware)"
	[ -d /var/lib/firmware ] || fail "the host firmware directory itself was removed"
	finish
}

scenario_unknown_symbol() {
	scenario unknown-symbol
	extract nodep /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_consumer
	EOF
	worker kmod load "$CONFIG"
	expect_failure UnknownSymbol "Unknown symbol kmm_ci_provider_value"
	expect_absent kmm_ci_consumer kmm_ci_provider
	finish
}

scenario_invalid_format() {
	scenario invalid-module-format-truncated
	extract broken /broken
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
		  dirName: /broken
	EOF
	worker kmod load "$CONFIG"
	expect_failure InvalidModuleFormat "Invalid ELF"
	expect_absent kmm_ci_param
	finish

	scenario invalid-module-format-vermagic
	extract vermagic /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
	EOF
	worker kmod load "$CONFIG"
	expect_failure InvalidModuleFormat "version magic"
	expect_absent kmm_ci_param
	finish
}

scenario_not_loaded_after_modprobe() {
	scenario not-loaded-after-modprobe
	extract main /opt
	echo "install kmm_ci_param /bin/true" >/etc/modprobe.d/kmm-test.conf
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
	EOF
	worker kmod load "$CONFIG"
	expect_failure ModuleNotLoaded "kmm_ci_param"
	expect_absent kmm_ci_param
	finish
}

# --- suite sigenforce (booted with module.sig_enforce=1) ---------------------------------------

scenario_sig_unsigned() {
	scenario signature-unsigned-rejected
	expect_file /sys/module/module/parameters/sig_enforce Y
	extract main /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
	EOF
	worker kmod load "$CONFIG"
	expect_failure SignatureRejected "Loading of unsigned module is rejected"
	expect_absent kmm_ci_param
	finish
}

scenario_sig_unknown_key() {
	scenario signature-unknown-key-rejected
	extract signed /opt
	config <<-EOF
		modprobe:
		  moduleName: kmm_ci_param
	EOF
	worker kmod load "$CONFIG"
	expect_failure SignatureRejected "unavailable key is rejected"
	expect_absent kmm_ci_param
	finish
}

scenario_sig_trusted() {
	scenario signature-trusted-loads
	extract debian /opt
	config <<-EOF
		modprobe:
		  moduleName: dummy
	EOF
	worker kmod load "$CONFIG"
	expect_success
	expect_loaded dummy
	worker kmod unload "$CONFIG"
	expect_success
	expect_absent dummy
	finish
}

case "$SUITE" in
main)
	scenario_invalid_config
	scenario_module_not_found
	scenario_load_order
	scenario_parameters
	scenario_invalid_parameter
	scenario_raw_args
	scenario_in_tree_removal
	scenario_firmware_missing
	scenario_firmware
	scenario_unknown_symbol
	scenario_invalid_format
	scenario_not_loaded_after_modprobe
	;;
sigenforce)
	scenario_sig_unsigned
	scenario_sig_unknown_key
	scenario_sig_trusted
	;;
*)
	echo "KMMTEST FAIL suite: unknown suite '$SUITE'"
	FAILED=1
	;;
esac

echo "KMMTEST DONE failed=$FAILED uptime=$(cut -d" " -f1 /proc/uptime)"
# isa-debug-exit at port 0xf4: QEMU exits with (value << 1) | 1.
if [ "$FAILED" = 0 ]; then printf '\000'; else printf '\001'; fi |
	dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
poweroff -f
