//! The relay's counters, gauges and latency histograms, kept with `prometheus-client` and written out
//! at `/metrics` in its text format (OpenMetrics). Labels are endpoint and status only: never a user,
//! session or token.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    endpoint: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Endpoint {
    endpoint: &'static str,
}

type Histograms = Family<Endpoint, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Answered, Counter>,
    latency: Histograms,
    provider_latency: Histogram,
    pub logout_accepted: Counter,
    pub logout_refused: Counter,
    pub logout_delivered: Counter,
    /// Event streams open now; the server also admits new ones against it.
    pub subscribers: Gauge,
    pub rate_limited: Counter,
    /// Registered only when the relay shares logouts through Redis.
    redis_up: Option<Gauge>,
}

impl Metrics {
    /// Every metric registered; `with_redis` adds `cis2_relay_redis_up`.
    pub fn new(with_redis: bool) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Answered, Counter>::default();
        registry.register(
            "cis2_relay_requests",
            "Requests answered, by endpoint and HTTP status",
            requests.clone(),
        );
        let latency: Histograms = Family::new_with_constructor(latency_histogram);
        registry.register(
            "cis2_relay_request_seconds",
            "Time to answer, by endpoint (event streams count as 0: they stay open)",
            latency.clone(),
        );
        let provider_latency = latency_histogram();
        registry.register(
            "cis2_relay_provider_seconds",
            "Time spent waiting for CIS2 (token and userinfo calls) per exchange",
            provider_latency.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let logout_accepted = counter(
            "cis2_relay_logout_tokens_accepted",
            "Back-channel logout tokens accepted",
        );
        let logout_refused = counter(
            "cis2_relay_logout_tokens_refused",
            "Back-channel logout tokens refused with 400",
        );
        let logout_delivered = counter(
            "cis2_relay_logout_events_delivered",
            "Logout events sent to subscribed agents",
        );
        let rate_limited = counter("cis2_relay_rate_limited", "Requests refused with 429");
        let subscribers = Gauge::default();
        registry.register(
            "cis2_relay_subscribers",
            "Agents holding an event stream open",
            subscribers.clone(),
        );
        let redis_up = with_redis.then(|| {
            let gauge = Gauge::default();
            registry.register(
                "cis2_relay_redis_up",
                "Whether the Redis logout subscription is live",
                gauge.clone(),
            );
            gauge
        });
        Metrics {
            registry,
            requests,
            latency,
            provider_latency,
            logout_accepted,
            logout_refused,
            logout_delivered,
            subscribers,
            rate_limited,
            redis_up,
        }
    }

    pub fn request(&self, endpoint: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&Answered { endpoint, status })
            .inc();
        self.latency
            .get_or_create(&Endpoint { endpoint })
            .observe(took.as_secs_f64());
    }

    pub fn provider(&self, took: Duration) {
        self.provider_latency.observe(took.as_secs_f64());
    }

    /// The text `/metrics` answers with; `redis_up` is the Redis subscription's state now.
    pub fn render(&self, redis_up: Option<bool>) -> String {
        if let (Some(gauge), Some(up)) = (&self.redis_up, redis_up) {
            gauge.set(i64::from(up));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples of `text` as (name with labels, value), comments left out.
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(name, value)| (name.to_owned(), value.parse().expect(value)))
            .collect()
    }

    fn value(text: &str, name: &str) -> Option<f64> {
        samples(text)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    #[test]
    fn the_text_format_has_cumulative_buckets_and_counts() {
        let metrics = Metrics::new(true);
        metrics.request("token", 200, Duration::from_millis(7));
        metrics.request("token", 200, Duration::from_millis(70));
        metrics.request("token", 400, Duration::from_millis(1));
        let text = metrics.render(Some(true));
        let at = |name: &str| value(&text, name);
        assert_eq!(
            at("cis2_relay_requests_total{endpoint=\"token\",status=\"200\"}"),
            Some(2.0)
        );
        assert_eq!(
            at("cis2_relay_requests_total{endpoint=\"token\",status=\"400\"}"),
            Some(1.0)
        );
        assert_eq!(
            at("cis2_relay_request_seconds_bucket{le=\"0.005\",endpoint=\"token\"}").or_else(
                || at("cis2_relay_request_seconds_bucket{endpoint=\"token\",le=\"0.005\"}")
            ),
            Some(1.0)
        );
        assert_eq!(
            at("cis2_relay_request_seconds_bucket{le=\"+Inf\",endpoint=\"token\"}").or_else(|| at(
                "cis2_relay_request_seconds_bucket{endpoint=\"token\",le=\"+Inf\"}"
            )),
            Some(3.0)
        );
        assert_eq!(
            at("cis2_relay_request_seconds_count{endpoint=\"token\"}"),
            Some(3.0)
        );
        assert_eq!(at("cis2_relay_redis_up"), Some(1.0));
        assert_eq!(
            value(&Metrics::new(false).render(None), "cis2_relay_redis_up"),
            None
        );
    }

    /// The sample names and label names the hand-written text format had before
    /// `prometheus-client`, which dashboards and alerts use: every one is still there, and nothing
    /// else; histogram bounds are the same numbers.
    #[test]
    fn names_and_labels_are_those_of_the_earlier_format() {
        let metrics = Metrics::new(true);
        metrics.request("token", 200, Duration::from_millis(7));
        metrics.provider(Duration::from_millis(30));
        let text = metrics.render(Some(false));
        let mut found: Vec<(String, Vec<String>)> = samples(&text)
            .into_iter()
            .filter(|(name, _)| !name.contains("le=") || name.contains("le=\"0.005\""))
            .map(|(sample, _)| {
                let (name, labels) = sample.split_once('{').unwrap_or((&sample, ""));
                let mut keys: Vec<String> = labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
                    .collect();
                keys.sort();
                (name.to_owned(), keys)
            })
            .collect();
        found.sort();
        let earlier: &[(&str, &[&str])] = &[
            ("cis2_relay_logout_events_delivered_total", &[]),
            ("cis2_relay_logout_tokens_accepted_total", &[]),
            ("cis2_relay_logout_tokens_refused_total", &[]),
            ("cis2_relay_provider_seconds_bucket", &["le"]),
            ("cis2_relay_provider_seconds_count", &[]),
            ("cis2_relay_provider_seconds_sum", &[]),
            ("cis2_relay_rate_limited_total", &[]),
            ("cis2_relay_redis_up", &[]),
            ("cis2_relay_request_seconds_bucket", &["endpoint", "le"]),
            ("cis2_relay_request_seconds_count", &["endpoint"]),
            ("cis2_relay_request_seconds_sum", &["endpoint"]),
            ("cis2_relay_requests_total", &["endpoint", "status"]),
            ("cis2_relay_subscribers", &[]),
        ];
        let earlier: Vec<(String, Vec<String>)> = earlier
            .iter()
            .map(|(n, l)| ((*n).to_owned(), l.iter().map(|l| (*l).to_owned()).collect()))
            .collect();
        assert_eq!(found, earlier, "{text}");

        let bounds: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("cis2_relay_provider_seconds_bucket"))
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect();
        let mut expected = BUCKETS.to_vec();
        expected.push(f64::INFINITY);
        assert_eq!(bounds, expected);
    }
}
