//! The option grammar of hype's spec strings: `HEAD,key=value,flag,...`, as in
//! `hype run --disk file:PATH,ro,socket=PATH` and `hype vmm --device PATH,queues=2`.
//!
//! One set of rules for every spec: options trail the head, are separated by commas, are a
//! known key with an optional `=value`, and each key is given at most once. Options are taken
//! from the right, so a head that may contain commas of its own (an http URL) keeps them.

use std::fmt;

/// Why a spec's options were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A part that is not a known option (the whole part, e.g. `colour=red`).
    #[error("unknown option {0:?}")]
    Unknown(String),
    /// A key given twice.
    #[error("option {0:?} given twice")]
    Duplicate(String),
}

impl OptionError {
    /// The key the error is about (`colour` for an unknown `colour=red`).
    pub fn key(&self) -> &str {
        match self {
            OptionError::Unknown(part) => part.split_once('=').map_or(part.as_str(), |(k, _)| k),
            OptionError::Duplicate(key) => key,
        }
    }
}

/// A spec split into its head and its options, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec<'a> {
    /// What comes before the options (a path, `scheme:value`, a URL); may be empty.
    pub head: &'a str,
    /// `(key, value)`: `None` for a bare flag (`ro`), `Some("")` for `key=`.
    pub options: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Spec<'a> {
    /// Splits `s`. Options are taken from the right while their key is in `known`; at the
    /// first part that is not, the rest is the head if `head_may_have_commas(rest)` (e.g. it
    /// is an http URL), otherwise that part is an [`OptionError::Unknown`].
    pub fn parse(
        s: &'a str,
        known: &[&str],
        head_may_have_commas: impl Fn(&str) -> bool,
    ) -> Result<Self, OptionError> {
        let mut head = s;
        let mut options: Vec<(&str, Option<&str>)> = Vec::new();
        while let Some((rest, last)) = head.rsplit_once(',') {
            let (key, value) = match last.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (last, None),
            };
            if !known.contains(&key) {
                if head_may_have_commas(rest) {
                    break;
                }
                return Err(OptionError::Unknown(last.to_string()));
            }
            if options.iter().any(|(k, _)| *k == key) {
                return Err(OptionError::Duplicate(key.to_string()));
            }
            options.push((key, value));
            head = rest;
        }
        options.reverse();
        Ok(Spec { head, options })
    }

    /// The head read as `key=value` with a known key (`socket=/run/d.sock` as the first part
    /// of a `--device`), if it is one.
    pub fn head_option(&self, known: &[&str]) -> Option<(&'a str, &'a str)> {
        self.head.split_once('=').filter(|(k, _)| known.contains(k))
    }
}

impl fmt::Display for Spec<'_> {
    /// The spec again, options in their order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.head)?;
        for (k, v) in &self.options {
            match v {
                Some(v) => write!(f, ",{k}={v}")?,
                None => write!(f, ",{k}")?,
            }
        }
        Ok(())
    }
}

/// Whether `s` starts like an http(s) URL, whose commas belong to it.
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: &[&str] = &["ro", "overlay", "socket"];

    #[test]
    fn heads_and_options() {
        let s = Spec::parse("file:/a/b.img,ro,socket=/s", DISK, is_url).unwrap();
        assert_eq!(s.head, "file:/a/b.img");
        assert_eq!(s.options, [("ro", None), ("socket", Some("/s"))]);
        assert_eq!(s.to_string(), "file:/a/b.img,ro,socket=/s");
        let s = Spec::parse("http://h/i?a=1,2,overlay=o", DISK, is_url).unwrap();
        assert_eq!(s.head, "http://h/i?a=1,2");
        assert_eq!(s.options, [("overlay", Some("o"))]);
        let s = Spec::parse("socket=/d.sock,type=blk", &["socket", "type"], |_| false).unwrap();
        assert_eq!(s.head_option(&["socket"]), Some(("socket", "/d.sock")));
        assert_eq!(Spec::parse("", DISK, is_url).unwrap().head, "");
    }

    #[test]
    fn unknown_and_duplicate_options() {
        let e = Spec::parse("file:a,colour=red", DISK, is_url).unwrap_err();
        assert_eq!(e, OptionError::Unknown("colour=red".into()));
        assert_eq!(e.key(), "colour");
        let e = Spec::parse("file:a,ro,ro", DISK, is_url).unwrap_err();
        assert_eq!(e, OptionError::Duplicate("ro".into()));
        assert!(Spec::parse("/a,b", DISK, |_| false).is_err());
    }
}
