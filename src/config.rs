//! Configuration: a TOML file whose every field has a built-in default, so `hongbao serve`
//! runs with no file at all. Unknown fields are refused (a typo must not silently fall back to
//! a default). Secrets resolve in this order: environment (`HONGBAO_*`), the config file, then
//! `keys.toml` in the data directory, generated on first start when nothing else gives them.

use crate::actors::ActorConfig;
use crate::events::sled_store::JournalConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the log, views and generated keys live.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub journal: JournalSection,
    pub actors: ActorSection,
    pub limits: Limits,
    pub rewards: RewardsSection,
    pub withdrawals: WithdrawalsSection,
    pub packets: PacketsSection,
    pub coupons: CouponsSection,
    pub audit: AuditSection,
    pub auth: AuthConfig,
    pub store: StoreSection,
    pub load_test: LoadTestSection,
    pub preflight: PreflightSection,
}

/// The night's plan, which `hongbao preflight` checks the node against (see `preflight`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreflightSection {
    /// The node's API (default: `server.addr`).
    pub url: Option<String>,
    /// The night's activities: each must have a budget with something remaining.
    pub activities: Vec<String>,
    /// Requests expected over the night: the data directory needs twice their disk.
    pub expected_requests: u64,
    /// Disk per request (the soak measured about 2,700 bytes: docs/BENCHMARKS.md).
    pub disk_bytes_per_request: u64,
    /// The planned state of every degradation switch.
    pub switches: std::collections::BTreeMap<String, bool>,
    /// Each payment channel's limit at the bank, in payments per second (bank and alipay
    /// must be stated); the channel's configured rate must not exceed it.
    pub channel_limits: std::collections::BTreeMap<String, u32>,
    /// Highest acceptable share of a channel's payments failing or timing out (0..1).
    pub channel_failure_rate_max: f64,
    /// Largest acceptable difference between the server's clock and this machine's (ms).
    pub clock_skew_ms_max: u64,
    /// The night's withdrawal policy, as `PUT /v1/admin/withdrawal-policy` takes it.
    pub withdrawal_policy: Option<toml::Value>,
}

impl Default for PreflightSection {
    fn default() -> Self {
        PreflightSection {
            url: None,
            activities: Vec::new(),
            expected_requests: 0,
            disk_bytes_per_request: 2_700,
            switches: Default::default(),
            channel_limits: Default::default(),
            channel_failure_rate_max: 0.05,
            clock_skew_ms_max: 2_000,
            withdrawal_policy: None,
        }
    }
}

/// Load-test traffic (`X-Hongbao-Load-Test: 1`, D7): served by a second engine with its own
/// log, views and simulated channels (see `http::load_test`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadTestSection {
    /// Serve marked requests (when false they are refused 403 `load_test_unavailable`).
    pub enabled: bool,
}

impl Default for LoadTestSection {
    fn default() -> Self {
        LoadTestSection { enabled: true }
    }
}

/// Where the load-test engine keeps its log and state, inside the data directory.
pub const LOAD_TEST_DIR: &str = "load-test";

/// Where the log lives: `sled` (embedded, in the data directory: the default) or NATS
/// JetStream (`nats://host:port[,host:port...]`). Views, snapshots, checkpoints and keys stay in
/// the data directory either way: they are derived or local.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `sled`, or `nats://host:port[,host:port...]`.
    pub url: String,
    /// The JetStream stream holding the log.
    pub stream: String,
    /// The first token of the log's JetStream subjects (`<prefix>.<kind>.<id>`); streams on
    /// one server need prefixes of their own.
    pub subject_prefix: String,
    /// Replicas of the log's stream (JetStream): 3 by default; 1 only with
    /// `single_replica_synced`.
    pub replicas: usize,
    /// The operator states that the JetStream server fsyncs every write (`sync_interval:
    /// always`), which makes one replica acceptable.
    pub single_replica_synced: bool,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            url: "sled".into(),
            stream: "HONGBAO_LOG".into(),
            subject_prefix: "hb".into(),
            replicas: crate::events::jetstream::REPLICAS_DEFAULT,
            single_replica_synced: false,
        }
    }
}

impl StoreSection {
    /// The JetStream durability stated here, checked (`None` for sled).
    pub fn jetstream(&self) -> Result<Option<crate::events::jetstream::Durability>, ConfigError> {
        if self.url == "sled" {
            return Ok(None);
        }
        let token = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if self.subject_prefix.is_empty() || !self.subject_prefix.chars().all(token) {
            return Err(ConfigError::Invalid(format!(
                "store.subject_prefix is one subject token of [A-Za-z0-9_-], not {:?}",
                self.subject_prefix
            )));
        }
        if !self.url.starts_with("nats://") {
            return Err(ConfigError::Invalid(format!(
                "store.url is sled or nats://host:port[,host:port...], not {:?}",
                self.url
            )));
        }
        crate::events::jetstream::Durability {
            replicas: self.replicas,
            single_replica_synced: self.single_replica_synced,
        }
        .check()
        .map(Some)
        .map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSection {
    /// The continuous audit in the server concludes its checks this often (0: off).
    pub continuous_every_ms: u64,
    /// The server signs a checkpoint of the log's head this often when it moved (0: only at
    /// shutdown). See `checkpoints`.
    pub checkpoint_every_ms: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            continuous_every_ms: 5_000,
            checkpoint_every_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CouponsSection {
    /// Intake shards (actors that accept requests, by seq_no).
    pub intake_shards: u32,
    /// Requests one intake event carries at most.
    pub intake_merge_max: usize,
    /// Layer 1 (risk, groups) requests per second; 0 = unlimited.
    pub layer1_per_s: u32,
    /// Layer 2 (stock) requests per second; 0 = unlimited.
    pub layer2_per_s: u32,
    /// N: requests one merged stock deduction takes at most.
    pub merge_max: usize,
    /// Merged groups in flight per layer.
    pub in_flight_max: usize,
    /// Requests held in memory by the layers; reading the log pauses beyond it.
    pub queue_max: usize,
    /// Risk rules (C12): users refused outright.
    pub risk_blocklist: Vec<String>,
    /// Risk rules: at most this many requests per user per window (0 = no velocity rule).
    pub risk_velocity_max: u32,
    pub risk_velocity_window_s: u64,
}

impl Default for CouponsSection {
    fn default() -> Self {
        let c = crate::flows::coupons::CouponConfig::default();
        CouponsSection {
            intake_shards: c.intake_shards,
            intake_merge_max: c.intake_merge_max,
            layer1_per_s: c.layer1_per_s,
            layer2_per_s: c.layer2_per_s,
            merge_max: c.merge_max,
            in_flight_max: c.in_flight_max,
            queue_max: c.queue_max,
            risk_blocklist: Vec::new(),
            risk_velocity_max: 0,
            risk_velocity_window_s: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PacketsSection {
    /// How often packet deadlines are checked (a packet expires within about this much).
    pub expiry_check_ms: u64,
    /// Transfers and refunds not done after this long are reported stuck.
    pub stuck_after_s: u64,
}

impl Default for PacketsSection {
    fn default() -> Self {
        let p = crate::flows::packets::PacketConfig::default();
        PacketsSection {
            expiry_check_ms: p.expiry_check.as_millis() as u64,
            stuck_after_s: p.stuck_after.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WithdrawalsSection {
    /// Payout attempts per order: the first and the retries (W7: 1 + 3).
    pub max_attempts: u32,
    /// Wait before each retry, in milliseconds; the last value repeats.
    pub retry_backoff_ms: Vec<u64>,
    /// Payouts per second per channel (0 = unlimited).
    pub bank_per_s: u32,
    pub alipay_per_s: u32,
    pub change_per_s: u32,
    pub lane_in_flight_max: usize,
    /// How often the compensation sweeper looks for stuck orders.
    pub sweep_interval_ms: u64,
    /// Orders not final after this age are compensated (W9; the seed's 4 hours).
    pub compensation_age_s: u64,
    /// Longest wait for one payment channel call; an unanswered payment is resolved by query.
    pub channel_call_timeout_ms: u64,
}

impl Default for WithdrawalsSection {
    fn default() -> Self {
        let w = crate::flows::withdrawals::WithdrawalConfig::default();
        use crate::domain::withdrawal::Channel;
        let rate = |c| w.rate_per_s.get(&c).copied().unwrap_or(0);
        WithdrawalsSection {
            max_attempts: w.max_attempts,
            retry_backoff_ms: w
                .retry_backoff
                .iter()
                .map(|d| d.as_millis() as u64)
                .collect(),
            bank_per_s: rate(Channel::Bank),
            alipay_per_s: rate(Channel::Alipay),
            change_per_s: rate(Channel::Change),
            lane_in_flight_max: w.in_flight_max,
            sweep_interval_ms: w.sweep_interval.as_millis() as u64,
            compensation_age_s: w.compensation_age.as_secs(),
            channel_call_timeout_ms: w.channel_call_timeout.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardsSection {
    /// Refuse rewards for activities without a budget (`serve --require-budgets` sets it).
    pub require_budgets: bool,
    /// Crediting rate per kind (per second); 0 means unlimited.
    pub cash_per_s: u32,
    pub subsidy_per_s: u32,
    pub item_per_s: u32,
    /// Credits running at once across lanes.
    pub lane_in_flight_max: usize,
    /// Accepted rewards held in memory by the lanes.
    pub lane_queue_max: usize,
    pub lane_checkpoint_interval_ms: u64,
    /// On a cluster: intake shards per activity (`cny@0`..), each accepting rewards against
    /// slices of the budget, so that one activity's intake spreads over the fleet. Every node
    /// of a deployment must agree (checked at start). A single node accepts every reward in
    /// its activity and ignores it.
    pub intake_shards: u32,
    /// On a cluster: the budget slice (fen) an intake shard asks for; the activity grants less
    /// when its budget runs low.
    pub slice_fen: u64,
}

/// Default intake shards per activity on a cluster.
pub const REWARD_INTAKE_SHARDS: u32 = 4;
/// Default budget slice: 1,000 yuan.
pub const REWARD_SLICE_FEN: u64 = 100_000;

impl Default for RewardsSection {
    fn default() -> Self {
        let lanes = crate::flows::reward_lanes::LaneConfig::default();
        let rate = |kind| lanes.rate_per_s.get(&kind).copied().unwrap_or(0);
        use crate::domain::activity::RewardKind;
        RewardsSection {
            require_budgets: false,
            cash_per_s: rate(RewardKind::Cash),
            subsidy_per_s: rate(RewardKind::Subsidy),
            item_per_s: rate(RewardKind::Item),
            lane_in_flight_max: lanes.in_flight_max,
            lane_queue_max: lanes.queue_max,
            lane_checkpoint_interval_ms: lanes.checkpoint_interval.as_millis() as u64,
            intake_shards: REWARD_INTAKE_SHARDS,
            slice_fen: REWARD_SLICE_FEN,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub addr: String,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Largest request body accepted (413 beyond).
    pub request_body_bytes_max: usize,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout_s: u64,
    /// How long a read waits for its projection to reach the log head before answering with
    /// what it has (read-your-writes for a client that just got a 2xx).
    pub read_wait_ms: u64,
    /// How long a connection may take to deliver a request's head before it is answered 408.
    /// Longer than the JetStream log's request timeout (15 s): an HTTP worker held by a log
    /// read while the log elects a leader must not turn requests that did arrive into 408s.
    pub request_head_timeout_ms: u64,
    /// Requests per second one API key may make (0: no limit); 429 `rate_limited` beyond.
    pub per_key_per_s: u32,
    /// Requests one API key may make at once before `per_key_per_s` applies (0: as many as
    /// `per_key_per_s`).
    pub per_key_burst: u32,
    /// Requests per second for one user's wallet paths (`/v1/wallets/{uid}/...`; 0: no limit).
    pub per_uid_per_s: u32,
    /// Burst of `per_uid_per_s` (0: as many as `per_uid_per_s`).
    pub per_uid_burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalSection {
    pub batch_events_max: usize,
    pub queue_requests_max: usize,
    pub append_events_max: usize,
    /// sled page cache, in bytes, shared by the log and the stream index (half each); the
    /// state database (views, snapshots) has one of the same size.
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorSection {
    pub idle_passivate_s: u64,
    pub active_soft_max: usize,
    pub idle_under_pressure_ms: u64,
    pub mailbox_capacity: usize,
    pub snapshot_every_events: u64,
    pub snapshot_on_passivate_events: u64,
    pub command_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest amount one command may move, in fen.
    pub amount_fen_max: u64,
    /// Largest page a listing returns.
    pub page_items_max: usize,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub admin_key: Option<String>,
    pub issuer_key: Option<String>,
    pub gateway_key: Option<String>,
    pub token_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            server: ServerConfig::default(),
            journal: JournalSection::default(),
            actors: ActorSection::default(),
            limits: Limits::default(),
            rewards: RewardsSection::default(),
            withdrawals: WithdrawalsSection::default(),
            packets: PacketsSection::default(),
            coupons: CouponsSection::default(),
            audit: AuditSection::default(),
            auth: AuthConfig::default(),
            store: StoreSection::default(),
            load_test: LoadTestSection::default(),
            preflight: PreflightSection::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:8080".into(),
            workers: 0,
            request_body_bytes_max: 64 * 1024,
            shutdown_timeout_s: 30,
            read_wait_ms: 1000,
            request_head_timeout_ms: 20_000,
            per_key_per_s: 0,
            per_key_burst: 0,
            per_uid_per_s: 0,
            per_uid_burst: 0,
        }
    }
}

impl Default for JournalSection {
    fn default() -> Self {
        let j = JournalConfig::default();
        JournalSection {
            batch_events_max: j.batch_events_max,
            queue_requests_max: j.queue_requests_max,
            append_events_max: j.append_events_max,
            cache_bytes: j.cache_bytes,
        }
    }
}

impl Default for ActorSection {
    fn default() -> Self {
        let a = ActorConfig::default();
        ActorSection {
            idle_passivate_s: a.idle_passivate.as_secs(),
            active_soft_max: a.active_soft_max,
            idle_under_pressure_ms: a.idle_under_pressure.as_millis() as u64,
            mailbox_capacity: a.mailbox_capacity,
            snapshot_every_events: a.snapshot_every_events,
            snapshot_on_passivate_events: a.snapshot_on_passivate_events,
            command_timeout_ms: a.command_timeout.as_millis() as u64,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // 1 billion yuan: far above any campaign movement, far below overflow.
            amount_fen_max: 100_000_000_000,
            page_items_max: 500,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("cannot write generated keys to {path}: {source}")]
    WriteKeys {
        path: String,
        source: std::io::Error,
    },
}

impl Config {
    /// The load-test engine's configuration: this one, with the log and state in
    /// `<data_dir>/load-test` and, on JetStream, the stream `<stream>_LOAD_TEST` on subjects
    /// `<subject_prefix>lt.>`.
    pub fn for_load_test(&self) -> Config {
        let mut config = self.clone();
        config.data_dir = self.data_dir.join(LOAD_TEST_DIR);
        config.store.stream = format!("{}_LOAD_TEST", self.store.stream);
        config.store.subject_prefix = format!("{}lt", self.store.subject_prefix);
        config
    }

    /// Reads a config file (every field optional).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (rate, burst, name) in [
            (
                self.server.per_key_per_s,
                self.server.per_key_burst,
                "per_key",
            ),
            (
                self.server.per_uid_per_s,
                self.server.per_uid_burst,
                "per_uid",
            ),
        ] {
            if rate == 0 && burst > 0 {
                return Err(ConfigError::Invalid(format!(
                    "server.{name}_burst is {burst} but server.{name}_per_s is 0 (no limit): set the rate too"
                )));
            }
        }
        self.store.jetstream()?;
        let positive = [
            (
                "journal.batch_events_max",
                self.journal.batch_events_max as u64,
            ),
            (
                "journal.queue_requests_max",
                self.journal.queue_requests_max as u64,
            ),
            (
                "journal.append_events_max",
                self.journal.append_events_max as u64,
            ),
            (
                "actors.mailbox_capacity",
                self.actors.mailbox_capacity as u64,
            ),
            ("actors.command_timeout_ms", self.actors.command_timeout_ms),
            (
                "server.request_body_bytes_max",
                self.server.request_body_bytes_max as u64,
            ),
            ("limits.amount_fen_max", self.limits.amount_fen_max),
            ("limits.page_items_max", self.limits.page_items_max as u64),
            (
                "rewards.lane_in_flight_max",
                self.rewards.lane_in_flight_max as u64,
            ),
            ("rewards.lane_queue_max", self.rewards.lane_queue_max as u64),
            (
                "rewards.lane_checkpoint_interval_ms",
                self.rewards.lane_checkpoint_interval_ms,
            ),
            ("rewards.intake_shards", self.rewards.intake_shards as u64),
            ("rewards.slice_fen", self.rewards.slice_fen),
            ("coupons.intake_shards", self.coupons.intake_shards as u64),
            (
                "coupons.intake_merge_max",
                self.coupons.intake_merge_max as u64,
            ),
            ("coupons.merge_max", self.coupons.merge_max as u64),
            ("coupons.in_flight_max", self.coupons.in_flight_max as u64),
            ("coupons.queue_max", self.coupons.queue_max as u64),
            (
                "coupons.risk_velocity_window_s",
                self.coupons.risk_velocity_window_s,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        if self.rewards.intake_shards > 64 {
            return Err(ConfigError::Invalid(
                "rewards.intake_shards must be 1 to 64".into(),
            ));
        }
        if self.coupons.intake_shards > 64 {
            return Err(ConfigError::Invalid(
                "coupons.intake_shards must be 1 to 64".into(),
            ));
        }
        if let Some(bad) = self
            .coupons
            .risk_blocklist
            .iter()
            .find(|u| crate::ids::Id::parse(u).is_err())
        {
            return Err(ConfigError::Invalid(format!(
                "coupons.risk_blocklist: {bad:?} is not a valid uid"
            )));
        }
        if self.withdrawals.retry_backoff_ms.is_empty() {
            return Err(ConfigError::Invalid(
                "withdrawals.retry_backoff_ms needs at least one value".into(),
            ));
        }
        if self.limits.amount_fen_max > i64::MAX as u64 {
            return Err(ConfigError::Invalid(
                "limits.amount_fen_max must fit in i64".into(),
            ));
        }
        Ok(())
    }

    pub fn journal(&self) -> JournalConfig {
        JournalConfig {
            batch_events_max: self.journal.batch_events_max,
            queue_requests_max: self.journal.queue_requests_max,
            append_events_max: self.journal.append_events_max,
            cache_bytes: self.journal.cache_bytes,
            ..JournalConfig::default()
        }
    }

    pub fn lanes(&self) -> crate::flows::reward_lanes::LaneConfig {
        use crate::domain::activity::RewardKind;
        crate::flows::reward_lanes::LaneConfig {
            rate_per_s: [
                (RewardKind::Cash, self.rewards.cash_per_s),
                (RewardKind::Subsidy, self.rewards.subsidy_per_s),
                (RewardKind::Item, self.rewards.item_per_s),
            ]
            .into_iter()
            .collect(),
            in_flight_max: self.rewards.lane_in_flight_max,
            queue_max: self.rewards.lane_queue_max,
            checkpoint_interval: Duration::from_millis(self.rewards.lane_checkpoint_interval_ms),
        }
    }

    pub fn withdrawals(&self) -> crate::flows::withdrawals::WithdrawalConfig {
        use crate::domain::withdrawal::Channel;
        let w = &self.withdrawals;
        crate::flows::withdrawals::WithdrawalConfig {
            max_attempts: w.max_attempts,
            retry_backoff: w
                .retry_backoff_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            rate_per_s: [
                (Channel::Bank, w.bank_per_s),
                (Channel::Alipay, w.alipay_per_s),
                (Channel::Change, w.change_per_s),
            ]
            .into_iter()
            .collect(),
            in_flight_max: w.lane_in_flight_max,
            sweep_interval: Duration::from_millis(w.sweep_interval_ms),
            compensation_age: Duration::from_secs(w.compensation_age_s),
            checkpoint_interval: Duration::from_millis(200),
            channel_call_timeout: Duration::from_millis(w.channel_call_timeout_ms.max(1)),
        }
    }

    pub fn coupons(&self) -> crate::flows::coupons::CouponConfig {
        use crate::domain::coupon::RiskRules;
        use crate::flows::coupons::CouponConfig;
        CouponConfig {
            intake_shards: self.coupons.intake_shards,
            intake_merge_max: self.coupons.intake_merge_max,
            layer1_per_s: self.coupons.layer1_per_s,
            layer2_per_s: self.coupons.layer2_per_s,
            merge_max: self.coupons.merge_max,
            in_flight_max: self.coupons.in_flight_max,
            queue_max: self.coupons.queue_max,
            checkpoint_interval: Duration::from_millis(200),
            risk: RiskRules {
                // Checked by `validate`.
                blocklist: self
                    .coupons
                    .risk_blocklist
                    .iter()
                    .filter_map(|u| crate::ids::Id::parse(u).ok())
                    .collect(),
                velocity_max: self.coupons.risk_velocity_max,
                velocity_window_ms: (self.coupons.risk_velocity_window_s * 1000) as i64,
            },
        }
    }

    pub fn packets(&self) -> crate::flows::packets::PacketConfig {
        crate::flows::packets::PacketConfig {
            expiry_check: Duration::from_millis(self.packets.expiry_check_ms),
            stuck_after: Duration::from_secs(self.packets.stuck_after_s),
            checkpoint_interval: Duration::from_millis(200),
            reward_intake_shards: 1,
        }
    }

    pub fn actors(&self) -> ActorConfig {
        ActorConfig {
            idle_passivate: Duration::from_secs(self.actors.idle_passivate_s),
            active_soft_max: self.actors.active_soft_max,
            idle_under_pressure: Duration::from_millis(self.actors.idle_under_pressure_ms),
            mailbox_capacity: self.actors.mailbox_capacity,
            snapshot_every_events: self.actors.snapshot_every_events,
            snapshot_on_passivate_events: self.actors.snapshot_on_passivate_events,
            command_timeout: Duration::from_millis(self.actors.command_timeout_ms),
        }
    }
}

/// The secrets the server runs with.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub admin: String,
    pub issuer: String,
    pub gateway: String,
    pub token_secret: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }") // never log secrets
    }
}

/// File in the data directory holding generated keys.
pub const KEYS_FILE: &str = "keys.toml";

/// Minimum length of a configured key, so that a placeholder like "x" is refused.
const KEY_CHARS_MIN: usize = 16;

impl Keys {
    /// Resolves the keys: environment, then config, then the data directory's `keys.toml`,
    /// generating that file (mode 0600) for whatever is still missing. Returns the keys and,
    /// when a file was written, its path.
    pub fn resolve(
        auth: &AuthConfig,
        data_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Keys, Option<PathBuf>), ConfigError> {
        let path = data_dir.join(KEYS_FILE);
        let stored: AuthConfig = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?,
            Err(_) => AuthConfig::default(),
        };
        let mut generated = stored.clone();
        let mut wrote = false;
        let mut pick = |var: &str,
                        configured: &Option<String>,
                        stored: &Option<String>,
                        slot: &mut Option<String>|
         -> Result<String, ConfigError> {
            if let Some(value) = env(var)
                .filter(|v| !v.is_empty())
                .or_else(|| configured.clone())
            {
                if value.len() < KEY_CHARS_MIN {
                    return Err(ConfigError::Invalid(format!(
                        "{var} (or its config field) must be at least {KEY_CHARS_MIN} characters"
                    )));
                }
                return Ok(value);
            }
            if let Some(value) = stored.clone() {
                return Ok(value);
            }
            let value = random_key();
            *slot = Some(value.clone());
            wrote = true;
            Ok(value)
        };
        let keys = Keys {
            admin: pick(
                "HONGBAO_ADMIN_KEY",
                &auth.admin_key,
                &stored.admin_key,
                &mut generated.admin_key,
            )?,
            issuer: pick(
                "HONGBAO_ISSUER_KEY",
                &auth.issuer_key,
                &stored.issuer_key,
                &mut generated.issuer_key,
            )?,
            gateway: pick(
                "HONGBAO_GATEWAY_KEY",
                &auth.gateway_key,
                &stored.gateway_key,
                &mut generated.gateway_key,
            )?,
            token_secret: pick(
                "HONGBAO_TOKEN_SECRET",
                &auth.token_secret,
                &stored.token_secret,
                &mut generated.token_secret,
            )?,
        };
        if !wrote {
            return Ok((keys, None));
        }
        std::fs::create_dir_all(data_dir).map_err(|source| ConfigError::WriteKeys {
            path: path.display().to_string(),
            source,
        })?;
        let text = format!(
            "# Generated by hongbao on first start. Keep secret. Environment variables\n\
             # HONGBAO_ADMIN_KEY, HONGBAO_ISSUER_KEY, HONGBAO_GATEWAY_KEY, HONGBAO_TOKEN_SECRET\n\
             # and the [auth] section of the config file override these.\n{}",
            toml::to_string(&generated).unwrap_or_default()
        );
        write_private(&path, &text).map_err(|source| ConfigError::WriteKeys {
            path: path.display().to_string(),
            source,
        })?;
        Ok((keys, Some(path)))
    }
}

fn random_key() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

/// Writes a secret file readable by its owner only (0600), atomically (a temporary file beside
/// it, synced, then renamed): the generated API keys, the checkpoint signing key.
#[cfg(unix)]
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_built_in_defaults_and_typos_are_refused() {
        // Goal: no configuration is needed, and a misspelt field is an error, not a default.
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.data_dir, PathBuf::from("data"));
        assert_eq!(config.server.addr, "127.0.0.1:8080");
        assert!(Config::from_toml("[server]\nadr = \"x\"").is_err());
        assert!(Config::from_toml("[journal]\nbatch_events_max = 0").is_err());
        let tuned = Config::from_toml("[journal]\nbatch_events_max = 64").unwrap();
        assert_eq!(tuned.journal().batch_events_max, 64);
    }

    #[test]
    fn keys_come_from_env_then_config_then_a_generated_file() {
        // Goal: precedence is env > config > keys.toml, generated once and then reused.
        let dir = tempfile::tempdir().unwrap();
        let none = |_: &str| None;
        let (first, wrote) = Keys::resolve(&AuthConfig::default(), dir.path(), none).unwrap();
        assert!(wrote.is_some());
        let (again, wrote_again) = Keys::resolve(&AuthConfig::default(), dir.path(), none).unwrap();
        assert_eq!(first, again);
        assert!(wrote_again.is_none());

        let auth = AuthConfig {
            admin_key: Some("config-admin-key-0001".into()),
            ..Default::default()
        };
        let env =
            |var: &str| (var == "HONGBAO_GATEWAY_KEY").then(|| "env-gateway-key-00001".to_string());
        let (keys, _) = Keys::resolve(&auth, dir.path(), env).unwrap();
        assert_eq!(keys.admin, "config-admin-key-0001");
        assert_eq!(keys.gateway, "env-gateway-key-00001");
        assert_eq!(keys.issuer, first.issuer);

        let short = AuthConfig {
            admin_key: Some("x".into()),
            ..Default::default()
        };
        assert!(Keys::resolve(&short, dir.path(), none).is_err());
    }
}
