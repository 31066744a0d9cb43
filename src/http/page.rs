//! The HTML pages the binary serves (`/`, `/logs.html`, `/messages.html`), with the headers
//! that keep a browser from turning them against their viewer: a Content-Security-Policy
//! that allows only the page's own inline script and style (by hash: an injected script or
//! handler does not run) and connections to this server, no framing (clickjacking), no
//! referrer (a `?token=` in the URL never leaves in a `Referer`) and no content sniffing.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};

/// A page served as is; its policy is computed once.
pub struct Page {
    html: &'static str,
    csp: OnceLock<HeaderValue>,
}

impl Page {
    pub const fn new(html: &'static str) -> Page {
        Page {
            html,
            csp: OnceLock::new(),
        }
    }

    pub fn response(&'static self) -> Response {
        with_headers(Html(self.html).into_response(), self.csp().clone())
    }

    /// The page with each `{{name}}` of `vars` replaced by its value, HTML-escaped. The
    /// placeholders stand outside the inline scripts and styles, so the policy stays the
    /// template's.
    pub fn render(&'static self, vars: &[(&str, &str)]) -> Response {
        let mut html = self.html.to_string();
        for (name, value) in vars {
            html = html.replace(&format!("{{{{{name}}}}}"), &escape(value));
        }
        with_headers(Html(html).into_response(), self.csp().clone())
    }

    fn csp(&'static self) -> &'static HeaderValue {
        self.csp.get_or_init(|| policy(self.html))
    }
}

/// `text` safe inside an HTML element or a quoted attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn with_headers(mut res: Response, csp: HeaderValue) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

/// The policy of a page: nothing but its own inline `<script>` and `<style>` elements,
/// same-origin fetches and WebSockets, and no framing.
fn policy(html: &str) -> HeaderValue {
    let hashes = |tag: &str| -> String {
        inline(html, tag)
            .map(|text| format!(" 'sha256-{}'", sha256_base64(text)))
            .collect()
    };
    let scripts = hashes("script");
    let styles = hashes("style");
    let csp = format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        if scripts.is_empty() {
            " 'none'"
        } else {
            &scripts
        },
        if styles.is_empty() {
            " 'none'"
        } else {
            &styles
        },
    );
    // Only ASCII went into it.
    HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
}

/// The text of every `<tag>...</tag>` element (without attributes, as the pages write them).
fn inline<'a>(html: &'a str, tag: &str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let text = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(text)
    })
}

fn sha256_base64(text: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_hash_of_each_inline_script_and_style() {
        let html = "<style>a{}</style><p><script>x()</script><script>y()</script>";
        let csp = policy(html);
        let csp = csp.to_str().unwrap();
        assert!(
            csp.contains(&format!("'sha256-{}'", sha256_base64("x()"))),
            "{csp}"
        );
        assert_eq!(csp.matches("'sha256-").count(), 3, "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        let none = policy("<p>no script</p>");
        assert!(none.to_str().unwrap().contains("script-src 'none'"));
    }

    #[test]
    fn templates_escape_their_values() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
