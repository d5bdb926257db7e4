//! Shell-like variable substitution, as KMM applies it to `containerImage`, `sign.unsignedImage`
//! and `sign.filesToSign`.
//!
//! Supported forms: `$VAR`, `${VAR}`, `${VAR-default}`, `${VAR:-default}`, `${VAR=default}`,
//! `${VAR:=default}`, `${VAR+alternative}`, `${VAR:+alternative}` and `$$` for a literal `$`.
//! Unknown variables expand to the empty string. Defaults and alternatives may themselves
//! contain variables. A `$` that starts no variable name is kept as it is.

use std::collections::BTreeMap;

/// A substitution that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstError {
    /// `${` without its `}`.
    #[error("{input:?}: \"${{\" at byte {position} has no closing \"}}\"")]
    Unclosed {
        /// The whole input.
        input: String,
        /// Byte offset of the `$`.
        position: usize,
    },
    /// `${...}` whose content is not a variable name with an optional operator.
    #[error("{input:?}: bad substitution \"${{{content}}}\"")]
    BadSubstitution {
        /// The whole input.
        input: String,
        /// What stood between the braces.
        content: String,
    },
}

/// Variables available to a substitution.
pub type Vars<'a> = BTreeMap<&'a str, String>;

/// Expands the variables of `input`.
///
/// ```
/// use std::collections::BTreeMap;
/// let vars = BTreeMap::from([("KERNEL_XYZ", "6.8.0".to_owned())]);
/// let out = kmm_core::subst::substitute("quay.io/x:${KERNEL_XYZ}-${MISSING:-v1}", &vars).unwrap();
/// assert_eq!(out, "quay.io/x:6.8.0-v1");
/// ```
pub fn substitute(input: &str, vars: &Vars<'_>) -> Result<String, SubstError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{') {
            let Some(close) = matching_brace(braced) else {
                return Err(SubstError::Unclosed {
                    input: input.to_owned(),
                    position: input.len() - rest.len() + dollar,
                });
            };
            out.push_str(&expand_braced(&braced[..close], input, vars)?);
            rest = &braced[close + 1..];
        } else {
            let name_len = name_length(after);
            if name_len == 0 {
                out.push('$');
            } else {
                out.push_str(lookup(vars, &after[..name_len]).unwrap_or_default());
            }
            rest = &after[name_len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Byte length of the variable name at the start of `s` (`[A-Za-z_][A-Za-z0-9_]*`), 0 if none.
fn name_length(s: &str) -> usize {
    let bytes = s.as_bytes();
    match bytes.first() {
        Some(b) if b.is_ascii_alphabetic() || *b == b'_' => bytes
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .unwrap_or(bytes.len()),
        _ => 0,
    }
}

/// Index of the `}` that closes a `${`, allowing nested `${...}` in defaults.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn lookup<'v>(vars: &'v Vars<'_>, name: &str) -> Option<&'v str> {
    vars.get(name).map(String::as_str)
}

fn expand_braced(content: &str, input: &str, vars: &Vars<'_>) -> Result<String, SubstError> {
    let bad = || SubstError::BadSubstitution {
        input: input.to_owned(),
        content: content.to_owned(),
    };
    let name_len = name_length(content);
    if name_len == 0 {
        return Err(bad());
    }
    let (name, op) = content.split_at(name_len);
    let value = lookup(vars, name);
    let (colon, op) = match op.strip_prefix(':') {
        Some(op) => (true, op),
        None => (false, op),
    };
    // With ':', an empty value counts as unset.
    let set = value.is_some_and(|v| !colon || !v.is_empty());
    let Some(kind) = op.chars().next() else {
        return if colon {
            Err(bad())
        } else {
            Ok(value.unwrap_or_default().to_owned())
        };
    };
    let word = &op[kind.len_utf8()..];
    match kind {
        '-' | '=' if set => Ok(value.unwrap_or_default().to_owned()),
        '-' | '=' => substitute(word, vars),
        '+' if set => substitute(word, vars),
        '+' => Ok(String::new()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars() -> Vars<'static> {
        BTreeMap::from([
            ("KERNEL_FULL_VERSION", "6.8.0-31-generic".to_owned()),
            ("KERNEL_XYZ", "6.8.0".to_owned()),
            ("MOD_NAME", "kmm-ci".to_owned()),
            ("EMPTY", String::new()),
        ])
    }

    #[test]
    fn substitution_table() {
        let cases = [
            ("plain:tag", "plain:tag"),
            (
                "r/$MOD_NAME:$KERNEL_FULL_VERSION",
                "r/kmm-ci:6.8.0-31-generic",
            ),
            ("r/${MOD_NAME}:${KERNEL_XYZ}", "r/kmm-ci:6.8.0"),
            ("r:${UNKNOWN}x", "r:x"),
            ("r:$UNKNOWN", "r:"),
            ("r:${UNKNOWN:-dflt}", "r:dflt"),
            ("r:${UNKNOWN-dflt}", "r:dflt"),
            ("r:${EMPTY-dflt}", "r:"),
            ("r:${EMPTY:-dflt}", "r:dflt"),
            ("r:${UNKNOWN:=dflt}", "r:dflt"),
            ("r:${KERNEL_XYZ:-dflt}", "r:6.8.0"),
            ("r:${KERNEL_XYZ+alt}", "r:alt"),
            ("r:${EMPTY+alt}", "r:alt"),
            ("r:${EMPTY:+alt}", "r:"),
            ("r:${UNKNOWN+alt}", "r:"),
            ("r:${UNKNOWN:-${KERNEL_XYZ}}", "r:6.8.0"),
            ("r:$$MOD_NAME", "r:$MOD_NAME"),
            ("cost$", "cost$"),
            ("a$-b", "a$-b"),
            ("$KERNEL_XYZ.x", "6.8.0.x"),
            (
                "/opt/lib/modules/${KERNEL_FULL_VERSION}/kmm_ci_?.ko",
                "/opt/lib/modules/6.8.0-31-generic/kmm_ci_?.ko",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                substitute(input, &vars()).as_deref(),
                Ok(expected),
                "{input}"
            );
        }
    }

    #[test]
    fn malformed_substitutions_are_errors() {
        assert!(matches!(
            substitute("r:${KERNEL_XYZ", &vars()),
            Err(SubstError::Unclosed { position: 2, .. })
        ));
        assert!(matches!(
            substitute("r:${}", &vars()),
            Err(SubstError::BadSubstitution { .. })
        ));
        assert!(matches!(
            substitute("r:${1abc}", &vars()),
            Err(SubstError::BadSubstitution { .. })
        ));
        assert!(matches!(
            substitute("r:${A?x}", &vars()),
            Err(SubstError::BadSubstitution { .. })
        ));
        let err = substitute("img:${KERNEL_XYZ", &vars()).unwrap_err();
        assert!(err.to_string().contains("no closing"), "{err}");
    }

    proptest! {
        #[test]
        fn never_panics(input in ".{0,64}") {
            let _ = substitute(&input, &vars());
        }

        #[test]
        fn text_without_dollar_is_unchanged(input in "[^$]{0,64}") {
            prop_assert_eq!(substitute(&input, &vars()), Ok(input));
        }
    }
}
