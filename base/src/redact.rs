//! Secrets out of printed URLs: [`redact_url`] hides a URL's user information
//! (`user:password@`) and the values of its query parameters (tokens, signatures), so a URL
//! can go into a log line, an error or a printed command without what authenticates it.

use std::borrow::Cow;

/// What stands in for a hidden part.
pub const REDACTED: &str = "***";

/// `url` with its user information replaced by [`REDACTED`] and every query value (and every
/// query part without `=`) replaced by it too; scheme, host, port, path, query keys and
/// fragment stay. Anything that does not look like `scheme://...` is returned unchanged
/// except for its query. Borrowed when there is nothing to hide.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let (before_frag, frag) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let (before_query, query) = match before_frag.find('?') {
        Some(i) => (&before_frag[..i], Some(&before_frag[i + 1..])),
        None => (before_frag, None),
    };
    let mut changed = false;
    let mut out = String::with_capacity(url.len());
    match before_query.find("://") {
        Some(i) => {
            let rest = &before_query[i + 3..];
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let authority = &rest[..auth_end];
            out.push_str(&before_query[..i + 3]);
            match authority.rfind('@') {
                Some(at) => {
                    changed = true;
                    out.push_str(REDACTED);
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            out.push_str(&rest[auth_end..]);
        }
        None => out.push_str(before_query),
    }
    if let Some(q) = query {
        out.push('?');
        for (n, part) in q.split('&').enumerate() {
            if n > 0 {
                out.push('&');
            }
            match part.split_once('=') {
                Some((k, "")) => {
                    out.push_str(k);
                    out.push('=');
                }
                Some((k, _)) => {
                    changed = true;
                    out.push_str(k);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                None if part.is_empty() => {}
                None => {
                    changed = true;
                    out.push_str(REDACTED);
                }
            }
        }
    }
    out.push_str(frag);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(url)
    }
}

/// `text` with every occurrence of `url` replaced by its [`redact_url`] form (for messages of
/// libraries that quote the URL they were given).
pub fn redact_in(text: &str, url: &str) -> String {
    let shown = redact_url(url);
    if url.is_empty() || shown == url {
        return text.to_owned();
    }
    text.replace(url, &shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_and_query_values_are_hidden() {
        assert_eq!(
            redact_url("https://alice:s3cret@example.com:8443/disk.raw"),
            "https://***@example.com:8443/disk.raw"
        );
        assert_eq!(redact_url("http://token@h/i"), "http://***@h/i");
        assert_eq!(
            redact_url("https://h/i.raw?X-Amz-Signature=abc&X-Amz-Expires=60&flag&empty=#frag"),
            "https://h/i.raw?X-Amz-Signature=***&X-Amz-Expires=***&***&empty=#frag"
        );
        // An @ in the path is not user information.
        assert_eq!(redact_url("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_url("http://u:p@h/a@b?t=1"), "http://***@h/a@b?t=***");
    }

    #[test]
    fn nothing_to_hide_is_borrowed() {
        for u in ["http://h/i.raw", "https://h:1/x#y", "not a url", ""] {
            assert!(matches!(redact_url(u), Cow::Borrowed(_)), "{u}");
            assert_eq!(redact_url(u), u);
        }
    }

    #[test]
    fn quoted_urls_are_replaced_in_messages() {
        let u = "http://a:b@h/i?k=v";
        assert_eq!(
            redact_in(&format!("error sending request for url ({u}): refused"), u),
            "error sending request for url (http://***@h/i?k=***): refused"
        );
        assert_eq!(redact_in("plain", "http://h/i"), "plain");
    }
}
