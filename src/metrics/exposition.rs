//! The two exposition formats of `/metrics` and the choice between them.
//!
//! Owns content negotiation (the scraper's `Accept` header) and the Prometheus text format
//! 0.0.4, which is written from the OpenMetrics text that `prometheus-client` encodes: the
//! same samples, with the TYPE and HELP of counters named as their `_total` samples (as
//! Prometheus and promtool expect of that format), info metrics as gauges named `_info`,
//! and no `# UNIT` or `# EOF` lines.

use std::fmt::Write as _;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: what Prometheus reads by default.
    Text,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics when it is asked for with a
    /// higher (or, named first, equal) quality than the text format; the text format
    /// otherwise, also when the header names neither (or is absent).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        // (format, quality, explicit): the first best one wins.
        let mut best: Option<(Format, f32, bool)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.trim().parse().unwrap_or(0.0),
                    "version" => version = Some(v.trim().trim_matches('"').to_string()),
                    _ => {}
                }
            }
            let candidate = match (media.as_str(), version.as_deref()) {
                ("application/openmetrics-text", None | Some("1.0.0" | "0.0.1")) => {
                    (Format::OpenMetrics, true)
                }
                ("text/plain", None | Some("0.0.4")) => (Format::Text, true),
                ("text/*" | "*/*", _) => (Format::Text, false),
                _ => continue,
            };
            if q <= 0.0 {
                continue;
            }
            let better = match best {
                None => true,
                Some((_, bq, bexplicit)) => q > bq || (q == bq && candidate.1 && !bexplicit),
            };
            if better {
                best = Some((candidate.0, q, candidate.1));
            }
        }
        best.map_or(Format::Text, |b| b.0)
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics text exposition as
/// `prometheus-client` writes it (counters, gauges, histograms, info; no exemplars).
pub fn to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, which decides the name both carry.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, text)| text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                kind => (name.to_string(), kind),
            };
            // Writing into a String cannot fail.
            if let Some(text) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
        } else if line.starts_with('#') {
            // `# UNIT` (in the name already) and `# EOF`.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_accept_header_gets_openmetrics() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn text_by_default_and_when_preferred() {
        for accept in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4"),
            Some("application/json"),
            Some("application/openmetrics-text;version=2.0.0"),
            Some("application/openmetrics-text;q=0"),
            Some("text/plain;version=0.0.4,application/openmetrics-text;q=0.5"),
            Some(
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.1",
            ),
        ] {
            assert_eq!(Format::negotiate(accept), Format::Text, "{accept:?}");
        }
        // Equal quality: a named format over a wildcard.
        assert_eq!(
            Format::negotiate(Some("*/*,application/openmetrics-text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn text_names_counters_by_their_samples() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total 3\n\
                  # HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n\
                  # HELP x_wait_seconds Wait.\n# TYPE x_wait_seconds histogram\n# UNIT x_wait_seconds seconds\n\
                  x_wait_seconds_sum 0.5\nx_wait_seconds_count 1\nx_wait_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        assert_eq!(
            to_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 3\n\
             # HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n\
             # HELP x_wait_seconds Wait.\n# TYPE x_wait_seconds histogram\n\
             x_wait_seconds_sum 0.5\nx_wait_seconds_count 1\nx_wait_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }
}
