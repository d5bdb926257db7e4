//! Why a load or unload failed: stable reasons (used as the NMC `lastFailure.reason` and in
//! events) derived from modprobe's output and the kernel log, and the termination message the
//! operator reads back from the worker pod.

use std::fmt;

/// A stable, machine-readable failure reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The config file is unreadable, malformed, has unknown keys or cannot work.
    InvalidConfig,
    /// The module (or its `modules.dep`) is not in the image for this kernel.
    ModuleNotFound,
    /// The module needs a symbol no loaded module exports.
    UnknownSymbol,
    /// A module parameter value the module rejects (unknown parameters are only ignored).
    InvalidParameter,
    /// Not a loadable module for this kernel: bad ELF, wrong vermagic or symbol versions.
    InvalidModuleFormat,
    /// Signature enforcement (or lockdown) refused the module's signature or its absence.
    SignatureRejected,
    /// Unload refused: other modules or users hold the module.
    ModuleInUse,
    /// The module's initialisation could not find its firmware.
    FirmwareMissing,
    /// Setting the firmware search path or copying or finding firmware files failed.
    FirmwareSetupFailed,
    /// modprobe succeeded but the module is not in the kernel (or was not there to unload).
    ModuleNotLoaded,
    /// The worker lacks the privilege to load or unload modules.
    PermissionDenied,
    /// Any other modprobe failure.
    ModprobeFailed,
}

impl Reason {
    /// The stable string of this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidConfig => "InvalidConfig",
            Reason::ModuleNotFound => "ModuleNotFound",
            Reason::UnknownSymbol => "UnknownSymbol",
            Reason::InvalidParameter => "InvalidParameter",
            Reason::InvalidModuleFormat => "InvalidModuleFormat",
            Reason::SignatureRejected => "SignatureRejected",
            Reason::ModuleInUse => "ModuleInUse",
            Reason::FirmwareMissing => "FirmwareMissing",
            Reason::FirmwareSetupFailed => "FirmwareSetupFailed",
            Reason::ModuleNotLoaded => "ModuleNotLoaded",
            Reason::PermissionDenied => "PermissionDenied",
            Reason::ModprobeFailed => "ModprobeFailed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure: what the worker exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Failure {
            reason,
            message: message.into(),
        }
    }

    /// The termination message: `<Reason>: <message>`, on one line, at most
    /// [`MAX_TERMINATION_MESSAGE`] bytes.
    pub fn termination_message(&self) -> String {
        let one_line = self
            .message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        truncate(
            &format!("{}: {one_line}", self.reason),
            MAX_TERMINATION_MESSAGE,
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Failure {}

/// Kubernetes keeps 4096 bytes of a termination message; stay well below.
pub const MAX_TERMINATION_MESSAGE: usize = 1024;

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Kernel log lines that identify a reason by themselves, most specific first.
const KERNEL_PATTERNS: &[(&str, Reason)] = &[
    ("Direct firmware load for", Reason::FirmwareMissing),
    // Debian's wording of the same failure.
    ("firmware: failed to load", Reason::FirmwareMissing),
    (
        "Loading of unsigned module is rejected",
        Reason::SignatureRejected,
    ),
    (
        "Loading of module with unavailable key is rejected",
        Reason::SignatureRejected,
    ),
    (
        "unsigned module loading is restricted",
        Reason::SignatureRejected,
    ),
    (
        "disagrees about version of symbol",
        Reason::InvalidModuleFormat,
    ),
    ("version magic", Reason::InvalidModuleFormat),
    ("Unknown symbol", Reason::UnknownSymbol),
    ("invalid for parameter", Reason::InvalidParameter),
    ("Invalid ELF", Reason::InvalidModuleFormat),
    ("ELF header", Reason::InvalidModuleFormat),
    ("truncated", Reason::InvalidModuleFormat),
];

/// modprobe (kmod) messages, checked when the kernel log says nothing specific.
const MODPROBE_PATTERNS: &[(&str, Reason)] = &[
    ("Key was rejected by service", Reason::SignatureRejected),
    ("Required key not available", Reason::SignatureRejected),
    ("Invalid module format", Reason::InvalidModuleFormat),
    ("Exec format error", Reason::InvalidModuleFormat),
    // kmod prints this for ENOENT from the kernel, which is mostly a missing symbol.
    ("Unknown symbol in module", Reason::UnknownSymbol),
    ("is in use", Reason::ModuleInUse),
    ("not found in directory", Reason::ModuleNotFound),
    ("could not open moddep file", Reason::ModuleNotFound),
    ("not found.", Reason::ModuleNotFound),
    ("is not in kernel", Reason::ModuleNotLoaded),
    ("Operation not permitted", Reason::PermissionDenied),
];

/// Classifies a failed modprobe run from its output lines (stdout and stderr) and the kernel
/// log records written while it ran.
pub fn classify(modprobe_output: &[String], kernel_log: &[String], exit: &str) -> Failure {
    let modprobe_line = modprobe_output
        .iter()
        .rev()
        .find(|line| line.contains("ERROR") || line.contains("FATAL"))
        .or_else(|| modprobe_output.iter().rev().find(|l| !l.trim().is_empty()))
        .cloned()
        .unwrap_or_else(|| format!("modprobe {exit}"));

    for (pattern, reason) in KERNEL_PATTERNS {
        let matching: Vec<&str> = kernel_log
            .iter()
            .filter(|line| line.contains(pattern))
            .map(String::as_str)
            .collect();
        if let Some(first) = matching.first() {
            let mut kernel = (*first).to_owned();
            if matching.len() > 1 {
                kernel.push_str(&format!(" (and {} more)", matching.len() - 1));
            }
            return Failure::new(*reason, format!("{modprobe_line} [kernel: {kernel}]"));
        }
    }
    let reason = MODPROBE_PATTERNS
        .iter()
        .find(|(pattern, _)| modprobe_output.iter().any(|line| line.contains(pattern)))
        .map_or(Reason::ModprobeFailed, |(_, reason)| *reason);
    Failure::new(reason, modprobe_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    /// Messages as kmod 30 and Linux 6.1 print them (several taken from the QEMU runs).
    #[test]
    fn modprobe_and_kernel_messages_map_to_reasons() {
        let cases: &[(&str, &str, Reason, &str)] = &[
            (
                "insmod /tmp/opt/lib/modules/6.1.0-56-amd64/kmm_ci_consumer.ko\nmodprobe: ERROR: could not insert 'kmm_ci_consumer': Unknown symbol in module, or unknown parameter (see dmesg)",
                "kmm_ci_consumer: Unknown symbol kmm_ci_provider_value (err -2)",
                Reason::UnknownSymbol,
                "[kernel: kmm_ci_consumer: Unknown symbol kmm_ci_provider_value (err -2)]",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_param': Invalid argument",
                "kmm_ci_param: `abc' invalid for parameter `level'",
                Reason::InvalidParameter,
                "`abc' invalid for parameter `level'",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_consumer': Unknown symbol in module, or unknown parameter (see dmesg)",
                "",
                Reason::UnknownSymbol,
                "could not insert 'kmm_ci_consumer'",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_param': Key was rejected by service",
                "Loading of unsigned module is rejected",
                Reason::SignatureRejected,
                "Key was rejected by service [kernel: Loading of unsigned module is rejected]",
            ),
            (
                "modprobe: ERROR: could not insert 'x': Required key not available",
                "",
                Reason::SignatureRejected,
                "Required key not available",
            ),
            (
                "modprobe: ERROR: could not insert 'x': Operation not permitted",
                "Lockdown: modprobe: unsigned module loading is restricted; see man kernel_lockdown.7",
                Reason::SignatureRejected,
                "Lockdown",
            ),
            (
                "modprobe: ERROR: could not insert 'x': Operation not permitted",
                "",
                Reason::PermissionDenied,
                "Operation not permitted",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_param': Exec format error",
                "Invalid ELF section header overflow",
                Reason::InvalidModuleFormat,
                "Exec format error [kernel: Invalid ELF section header overflow]",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_param': Invalid module format",
                "",
                Reason::InvalidModuleFormat,
                "Invalid module format",
            ),
            (
                "modprobe: ERROR: could not insert 'x': Invalid module format",
                "x: version magic '6.1.0-55-amd64 SMP mod_unload' should be '6.1.0-56-amd64 SMP mod_unload'",
                Reason::InvalidModuleFormat,
                "version magic",
            ),
            (
                "modprobe: ERROR: could not insert 'x': Invalid argument",
                "x: disagrees about version of symbol module_layout",
                Reason::InvalidModuleFormat,
                "disagrees",
            ),
            (
                "modprobe: FATAL: Module kmm_ci_provider is in use.",
                "",
                Reason::ModuleInUse,
                "modprobe: FATAL: Module kmm_ci_provider is in use.",
            ),
            (
                "modprobe: FATAL: Module kmm_ci_nope not found in directory /tmp/opt/lib/modules/6.1.0-56-amd64",
                "",
                Reason::ModuleNotFound,
                "not found in directory",
            ),
            (
                "modprobe: FATAL: could not load /tmp/opt/lib/modules/6.1.0-56-amd64/modules.dep: No such file or directory",
                "",
                Reason::ModprobeFailed,
                "modules.dep",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_fw': Unknown symbol in module, or unknown parameter (see dmesg)",
                "kmm_ci_fw kmm_ci_fw: Direct firmware load for kmm_ci_fw.bin failed with error -2",
                Reason::FirmwareMissing,
                "Direct firmware load for kmm_ci_fw.bin",
            ),
            (
                "modprobe: ERROR: could not insert 'kmm_ci_fw': Unknown symbol in module, or unknown parameter (see dmesg)",
                "platform kmm_ci_fw: firmware: failed to load kmm_ci_fw.bin (-2)",
                Reason::FirmwareMissing,
                "failed to load kmm_ci_fw.bin",
            ),
            (
                "modprobe: FATAL: Module dummy is not in kernel.",
                "",
                Reason::ModuleNotLoaded,
                "is not in kernel",
            ),
            (
                "modprobe: ERROR: could not insert 'x': Cannot allocate memory",
                "",
                Reason::ModprobeFailed,
                "Cannot allocate memory",
            ),
        ];
        for (output, kernel, reason, fragment) in cases {
            let failure = classify(&lines(output), &lines(kernel), "exit status: 1");
            assert_eq!(failure.reason, *reason, "{output} / {kernel}");
            assert!(failure.message.contains(fragment), "{failure}");
        }
    }

    #[test]
    fn kernel_lines_are_summarised_and_silence_is_reported() {
        let kernel = lines("a: Unknown symbol s1 (err -2)\na: Unknown symbol s2 (err -2)");
        let failure = classify(&[], &kernel, "exit status: 1");
        assert_eq!(failure.reason, Reason::UnknownSymbol);
        assert_eq!(
            failure.message,
            "modprobe exit status: 1 [kernel: a: Unknown symbol s1 (err -2) (and 1 more)]"
        );
        let failure = classify(&[], &[], "exit status: 1");
        assert_eq!(
            failure,
            Failure::new(Reason::ModprobeFailed, "modprobe exit status: 1")
        );
    }

    #[test]
    fn termination_messages_are_one_short_line() {
        let failure = Failure::new(Reason::ModuleInUse, "line one\n  line two");
        assert_eq!(
            failure.termination_message(),
            "ModuleInUse: line one line two"
        );
        let long = Failure::new(Reason::ModprobeFailed, "é".repeat(2000));
        let message = long.termination_message();
        assert!(message.len() <= MAX_TERMINATION_MESSAGE);
        assert!(message.starts_with("ModprobeFailed: é") && message.ends_with("..."));
    }

    #[test]
    fn reason_strings_are_stable() {
        let all = [
            (Reason::InvalidConfig, "InvalidConfig"),
            (Reason::ModuleNotFound, "ModuleNotFound"),
            (Reason::UnknownSymbol, "UnknownSymbol"),
            (Reason::InvalidParameter, "InvalidParameter"),
            (Reason::InvalidModuleFormat, "InvalidModuleFormat"),
            (Reason::SignatureRejected, "SignatureRejected"),
            (Reason::ModuleInUse, "ModuleInUse"),
            (Reason::FirmwareMissing, "FirmwareMissing"),
            (Reason::FirmwareSetupFailed, "FirmwareSetupFailed"),
            (Reason::ModuleNotLoaded, "ModuleNotLoaded"),
            (Reason::PermissionDenied, "PermissionDenied"),
            (Reason::ModprobeFailed, "ModprobeFailed"),
        ];
        for (reason, text) in all {
            assert_eq!(reason.as_str(), text);
        }
    }
}
