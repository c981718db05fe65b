//! Prometheus metrics, one registry per running instance (tests start several in one process).
//!
//! Names follow Prometheus conventions: a `hongbao_` prefix, units last (`_seconds`,
//! `_events`), counters end in `_total`.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_request_duration_seconds: HistogramVec,
    pub journal_batch_events: Histogram,
    pub journal_flush_seconds: Histogram,
    pub journal_append_seconds: Histogram,
    pub journal_conflicts_total: IntCounter,
    pub events_appended_total: IntCounterVec,
    pub log_head_seq: IntGauge,
    pub actors_active: IntGaugeVec,
    pub actor_activations_total: IntCounterVec,
    pub actor_passivations_total: IntCounterVec,
    pub projection_checkpoint_seq: IntGaugeVec,
}

/// Latency buckets from 50 us to about 13 s: covers a cached read and a stalled flush alike.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.000_05, 2.0, 19).expect("static bucket layout")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let http_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "hongbao_http_request_duration_seconds",
                "HTTP request latency by route pattern, method and status",
            )
            .buckets(latency_buckets()),
            &["route", "method", "status"],
        )
        .expect("metric definition");
        let journal_batch_events = Histogram::with_opts(
            HistogramOpts::new(
                "hongbao_journal_batch_events",
                "Events written per journal batch (one flush each)",
            )
            .buckets(exponential_buckets(1.0, 2.0, 14).expect("static bucket layout")),
        )
        .expect("metric definition");
        let journal_flush_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "hongbao_journal_flush_seconds",
                "Duration of one journal flush",
            )
            .buckets(latency_buckets()),
        )
        .expect("metric definition");
        let journal_append_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "hongbao_journal_append_seconds",
                "Time from submitting an append to its durable acknowledgement",
            )
            .buckets(latency_buckets()),
        )
        .expect("metric definition");
        let journal_conflicts_total = IntCounter::new(
            "hongbao_journal_conflicts_total",
            "Appends refused because the stream was not at the expected version",
        )
        .expect("metric definition");
        let events_appended_total = IntCounterVec::new(
            Opts::new(
                "hongbao_events_appended_total",
                "Events made durable, by stream kind",
            ),
            &["kind"],
        )
        .expect("metric definition");
        let log_head_seq =
            IntGauge::new("hongbao_log_head_seq", "Sequence of the last durable event")
                .expect("metric definition");
        let actors_active = IntGaugeVec::new(
            Opts::new("hongbao_actors_active", "Actors currently active, by kind"),
            &["kind"],
        )
        .expect("metric definition");
        let actor_activations_total = IntCounterVec::new(
            Opts::new(
                "hongbao_actor_activations_total",
                "Actor activations (replay from log)",
            ),
            &["kind"],
        )
        .expect("metric definition");
        let actor_passivations_total = IntCounterVec::new(
            Opts::new(
                "hongbao_actor_passivations_total",
                "Actors stopped after idling",
            ),
            &["kind"],
        )
        .expect("metric definition");
        let projection_checkpoint_seq = IntGaugeVec::new(
            Opts::new(
                "hongbao_projection_checkpoint_seq",
                "Last log sequence applied to each projection",
            ),
            &["projection"],
        )
        .expect("metric definition");

        let metrics = Metrics {
            registry,
            http_request_duration_seconds,
            journal_batch_events,
            journal_flush_seconds,
            journal_append_seconds,
            journal_conflicts_total,
            events_appended_total,
            log_head_seq,
            actors_active,
            actor_activations_total,
            actor_passivations_total,
            projection_checkpoint_seq,
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.http_request_duration_seconds.clone()),
            Box::new(self.journal_batch_events.clone()),
            Box::new(self.journal_flush_seconds.clone()),
            Box::new(self.journal_append_seconds.clone()),
            Box::new(self.journal_conflicts_total.clone()),
            Box::new(self.events_appended_total.clone()),
            Box::new(self.log_head_seq.clone()),
            Box::new(self.actors_active.clone()),
            Box::new(self.actor_activations_total.clone()),
            Box::new(self.actor_passivations_total.clone()),
            Box::new(self.projection_checkpoint_seq.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("each metric is registered once");
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The kind part of a stream id (`wallet` of `wallet:u42`), used as a metric label.
pub fn stream_kind(stream: &str) -> &str {
    stream.split(':').next().unwrap_or("unknown")
}
