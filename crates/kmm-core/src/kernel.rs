//! Kernel version strings: the trimming and normalisation KMM applies to a node's kernel, the
//! substitution variables derived from it, and the DNS-safe form used in object names and labels.

use std::collections::BTreeMap;

/// A kernel version that cannot provide the substitution variables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid kernel version {kernel:?}: expected at least three components separated by '.', ',' or '-' (for example 6.8.0-31-generic)"
)]
pub struct InvalidKernelVersion {
    /// The kernel version as given.
    pub kernel: String,
}

/// The kernel of a node as KMM matches it: `status.nodeInfo.kernelVersion` without a trailing
/// `+` (kernels built from a dirty tree carry one).
pub fn node_kernel(kernel_version: &str) -> &str {
    kernel_version.strip_suffix('+').unwrap_or(kernel_version)
}

/// Replaces every character outside `[A-Za-z0-9._-]` with `_`, as KMM does before substituting.
pub fn normalize(kernel: &str) -> String {
    kernel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Names of the kernel substitution variables.
pub mod var {
    /// The whole (normalised) kernel version.
    pub const KERNEL_FULL_VERSION: &str = "KERNEL_FULL_VERSION";
    /// Same as [`KERNEL_FULL_VERSION`].
    pub const KERNEL_VERSION: &str = "KERNEL_VERSION";
    /// `X.Y.Z`.
    pub const KERNEL_XYZ: &str = "KERNEL_XYZ";
    /// First component.
    pub const KERNEL_X: &str = "KERNEL_X";
    /// Second component.
    pub const KERNEL_Y: &str = "KERNEL_Y";
    /// Third component.
    pub const KERNEL_Z: &str = "KERNEL_Z";
    /// Module name (only in `containerImage`).
    pub const MOD_NAME: &str = "MOD_NAME";
    /// Module namespace (only in `containerImage`).
    pub const MOD_NAMESPACE: &str = "MOD_NAMESPACE";
}

/// The kernel substitution variables of one kernel version.
///
/// ```
/// let vars = kmm_core::kernel::kernel_vars("6.8.0-31-generic").unwrap();
/// assert_eq!(vars["KERNEL_XYZ"], "6.8.0");
/// assert_eq!(vars["KERNEL_FULL_VERSION"], "6.8.0-31-generic");
/// ```
pub fn kernel_vars(kernel: &str) -> Result<BTreeMap<&'static str, String>, InvalidKernelVersion> {
    let full = normalize(kernel);
    let parts: Vec<&str> = full.split(['.', ',', '-']).collect();
    let [x, y, z, ..] = parts.as_slice() else {
        return Err(InvalidKernelVersion {
            kernel: kernel.to_owned(),
        });
    };
    let vars = BTreeMap::from([
        (var::KERNEL_XYZ, format!("{x}.{y}.{z}")),
        (var::KERNEL_X, (*x).to_owned()),
        (var::KERNEL_Y, (*y).to_owned()),
        (var::KERNEL_Z, (*z).to_owned()),
        (var::KERNEL_VERSION, full.clone()),
        (var::KERNEL_FULL_VERSION, full),
    ]);
    Ok(vars)
}

/// Longest label value Kubernetes accepts; the DNS-safe kernel is used as one.
const MAX_LABEL_VALUE: usize = 63;

/// The kernel version as it appears in build and sign pod names and in the `target-kernel`
/// label: lower case, every character outside `[a-z0-9-]` turned into `-`, no leading or
/// trailing `-`, at most 63 characters.
///
/// Go KMM only replaces `.` and `_`; kmm-rs also replaces other characters and caps the length,
/// so that no kernel string can produce an invalid name (documented in docs/compatibility.md).
pub fn dns_safe(kernel: &str) -> String {
    let replaced: String = kernel
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = replaced.trim_matches('-');
    let capped = trimmed.get(..MAX_LABEL_VALUE).unwrap_or(trimmed);
    capped.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_kernel_drops_one_trailing_plus() {
        assert_eq!(node_kernel("6.1.0+"), "6.1.0");
        assert_eq!(node_kernel("6.1.0"), "6.1.0");
        assert_eq!(node_kernel("6.1.0++"), "6.1.0+");
    }

    #[test]
    fn kernel_vars_of_the_spec_example() {
        let vars = kernel_vars("6.8.0-31-generic").unwrap();
        let expected = [
            ("KERNEL_FULL_VERSION", "6.8.0-31-generic"),
            ("KERNEL_VERSION", "6.8.0-31-generic"),
            ("KERNEL_XYZ", "6.8.0"),
            ("KERNEL_X", "6"),
            ("KERNEL_Y", "8"),
            ("KERNEL_Z", "0"),
        ];
        assert_eq!(vars.len(), expected.len());
        for (name, value) in expected {
            assert_eq!(vars[name], value, "{name}");
        }
        assert!(!vars.contains_key("KERNEL_XY"), "Go KMM has no KERNEL_XY");
    }

    #[test]
    fn kernel_vars_table() {
        let cases = [
            (
                "4.18.0-372.19.1.el8_6.x86_64",
                Some(("4.18.0", "4.18.0-372.19.1.el8_6.x86_64")),
            ),
            (
                "5.14.0-284.el9.x86_64",
                Some(("5.14.0", "5.14.0-284.el9.x86_64")),
            ),
            ("6.1.0-56-amd64", Some(("6.1.0", "6.1.0-56-amd64"))),
            // Normalisation runs first and turns "," into "_", as in Go KMM.
            ("6,2,7", None),
            // Characters outside [A-Za-z0-9._-] become '_'.
            ("6.8.0-1~rc1", Some(("6.8.0", "6.8.0-1_rc1"))),
            ("6.8", None),
            ("6", None),
            ("", None),
        ];
        for (kernel, expected) in cases {
            let got = kernel_vars(kernel).ok().map(|vars| {
                (
                    vars["KERNEL_XYZ"].clone(),
                    vars["KERNEL_FULL_VERSION"].clone(),
                )
            });
            let expected = expected.map(|(xyz, full)| (xyz.to_owned(), full.to_owned()));
            assert_eq!(got, expected, "{kernel}");
        }
    }

    #[test]
    fn too_few_components_error_names_the_kernel() {
        let err = kernel_vars("6.8").unwrap_err();
        assert!(err.to_string().contains("\"6.8\""), "{err}");
        assert!(err.to_string().contains("three components"), "{err}");
    }

    #[test]
    fn dns_safe_table() {
        let cases = [
            (
                "4.18.0-372.19.1.el8_6.x86_64",
                "4-18-0-372-19-1-el8-6-x86-64",
            ),
            ("6.8.0-31-Generic", "6-8-0-31-generic"),
            ("-6.1_", "6-1"),
            ("6.1.0+dirty~x", "6-1-0-dirty-x"),
            ("", ""),
        ];
        for (kernel, expected) in cases {
            assert_eq!(dns_safe(kernel), expected, "{kernel}");
        }
        let long = format!("{}.x", "1".repeat(70));
        let safe = dns_safe(&long);
        assert!(safe.len() <= 63);
        let dash_at_cut = format!("{}.{}", "1".repeat(62), "2".repeat(10));
        assert_eq!(dns_safe(&dash_at_cut), "1".repeat(62));
    }
}
