//! Counters and latency histograms, written out in the Prometheus text format (version 0.0.4) at
//! `/metrics`. Labels are endpoint and status only: never a user, session or token.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    provider_latency: Mutex<Histogram>,
    pub logout_accepted: AtomicU64,
    pub logout_refused: AtomicU64,
    pub logout_delivered: AtomicU64,
    pub subscribers: AtomicU64,
    pub rate_limited: AtomicU64,
}

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint, status))
            .or_default() += 1;
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint)
            .or_default()
            .observe(took.as_secs_f64());
    }

    pub fn provider(&self, took: Duration) {
        self.provider_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(took.as_secs_f64());
    }

    pub fn render(&self, redis_up: Option<bool>) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP cis2_relay_requests_total Requests answered, by endpoint and HTTP status.\n",
        );
        out.push_str("# TYPE cis2_relay_requests_total counter\n");
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "cis2_relay_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP cis2_relay_request_seconds Time to answer, by endpoint (event streams count as 0: they stay open).\n");
        out.push_str("# TYPE cis2_relay_request_seconds histogram\n");
        for (endpoint, histogram) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            histogram.write(
                &mut out,
                "cis2_relay_request_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        out.push_str("# HELP cis2_relay_provider_seconds Time spent waiting for CIS2 (token and userinfo calls) per exchange.\n");
        out.push_str("# TYPE cis2_relay_provider_seconds histogram\n");
        self.provider_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&mut out, "cis2_relay_provider_seconds", "");
        let counters = [
            (
                "cis2_relay_logout_tokens_accepted_total",
                "Back-channel logout tokens accepted.",
                &self.logout_accepted,
            ),
            (
                "cis2_relay_logout_tokens_refused_total",
                "Back-channel logout tokens refused with 400.",
                &self.logout_refused,
            ),
            (
                "cis2_relay_logout_events_delivered_total",
                "Logout events sent to subscribed agents.",
                &self.logout_delivered,
            ),
            (
                "cis2_relay_rate_limited_total",
                "Requests refused with 429.",
                &self.rate_limited,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cis2_relay_subscribers Agents holding an event stream open.\n# TYPE cis2_relay_subscribers gauge\ncis2_relay_subscribers {}",
            self.subscribers.load(Ordering::Relaxed)
        );
        if let Some(up) = redis_up {
            let _ = writeln!(
                out,
                "# HELP cis2_relay_redis_up Whether the Redis logout subscription is live.\n# TYPE cis2_relay_redis_up gauge\ncis2_relay_redis_up {}",
                u8::from(up)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_cumulative_buckets_and_counts() {
        let metrics = Metrics::default();
        metrics.request("token", 200, Duration::from_millis(7));
        metrics.request("token", 200, Duration::from_millis(70));
        metrics.request("token", 400, Duration::from_millis(1));
        let text = metrics.render(Some(true));
        assert!(text.contains("cis2_relay_requests_total{endpoint=\"token\",status=\"200\"} 2\n"));
        assert!(text.contains("cis2_relay_requests_total{endpoint=\"token\",status=\"400\"} 1\n"));
        assert!(
            text.contains("cis2_relay_request_seconds_bucket{endpoint=\"token\",le=\"0.005\"} 1\n")
        );
        assert!(
            text.contains("cis2_relay_request_seconds_bucket{endpoint=\"token\",le=\"0.01\"} 2\n")
        );
        assert!(
            text.contains("cis2_relay_request_seconds_bucket{endpoint=\"token\",le=\"+Inf\"} 3\n")
        );
        assert!(text.contains("cis2_relay_request_seconds_count{endpoint=\"token\"} 3\n"));
        assert!(text.contains("cis2_relay_redis_up 1\n"));
    }
}
