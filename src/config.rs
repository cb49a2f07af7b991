//! Command line and environment: every flag has a `HOLDFAST_*` variable (DESIGN §8), parsed by
//! clap and validated into [`Settings`] before anything starts, so a bad value ends the process
//! with one clear line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

pub use crate::checkout::GroupSettings;

#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "A checkout engine that never oversells and never double-charges"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Clone, Subcommand, PartialEq)]
pub enum Command {
    /// Run the HTTP service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Check the promises on a live store; exit 1 on any violation.
    Audit,
    /// Replay a flash sale or a steady shopping mix against a running holdfast on this
    /// machine; exit 1 on oversell or a failed audit.
    Loadgen(crate::loadgen::LoadgenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// Address to listen on.
    #[arg(
        long,
        env = "HOLDFAST_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: SocketAddr,

    /// Directory for the embedded store and generated secrets.
    #[arg(
        long,
        env = "HOLDFAST_DATA_DIR",
        default_value = "./holdfast-data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// `postgres://...` runs on PostgreSQL; unset uses SQLite in the data directory.
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Connections in the PostgreSQL pool.
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub database_max_connections: u32,

    /// Redis for the flash-sale gate; unset uses the in-process gate.
    #[arg(
        long,
        env = "HOLDFAST_REDIS_URL",
        global = true,
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key the flash-sale gate uses.
    #[arg(
        long,
        env = "HOLDFAST_REDIS_KEY_PREFIX",
        default_value = "holdfast:",
        global = true
    )]
    pub redis_key_prefix: String,

    /// NATS JetStream for fulfilment events; unset uses in-process consumers.
    #[arg(long, env = "HOLDFAST_NATS_URL", global = true, hide_env_values = true)]
    pub nats_url: Option<String>,

    /// JetStream stream holding the fulfilment events (created if missing).
    #[arg(
        long,
        env = "HOLDFAST_NATS_STREAM",
        default_value = "HOLDFAST_ORDERS",
        global = true
    )]
    pub nats_stream: String,

    /// Events are published to `<prefix>.<topic>`, e.g. `holdfast.order.paid`.
    #[arg(
        long,
        env = "HOLDFAST_NATS_SUBJECT_PREFIX",
        default_value = "holdfast",
        global = true
    )]
    pub nats_subject_prefix: String,

    /// How often the outbox relay looks for unpublished events, in milliseconds.
    #[arg(
        long,
        env = "HOLDFAST_RELAY_INTERVAL_MS",
        default_value_t = 200,
        global = true
    )]
    pub relay_interval_ms: u64,

    /// Bearer token for /v1/admin/*; unset generates one into <data-dir>/admin-token.
    #[arg(
        long,
        env = "HOLDFAST_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<SecretArg>,

    /// Stripe secret key; unset uses the built-in test-mode simulator.
    #[arg(
        long,
        env = "HOLDFAST_STRIPE_SECRET_KEY",
        global = true,
        hide_env_values = true
    )]
    pub stripe_secret_key: Option<SecretArg>,

    /// Stripe API base URL.
    #[arg(long, env = "HOLDFAST_STRIPE_API_BASE", global = true)]
    pub stripe_api_base: Option<String>,

    /// Webhook signing secret (`whsec_...`; several comma-separated while rotating); unset
    /// generates one into <data-dir>/webhook-secret.
    #[arg(
        long,
        env = "HOLDFAST_STRIPE_WEBHOOK_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub stripe_webhook_secret: Option<SecretArg>,

    /// Reservation window; a heartbeat pushes expiry to now + this.
    #[arg(
        long,
        env = "HOLDFAST_RESERVATION_TTL_SECONDS",
        default_value_t = 180,
        global = true
    )]
    pub reservation_ttl_seconds: u64,

    /// A checkout's reservation never lives longer than this, heartbeats or not.
    #[arg(
        long,
        env = "HOLDFAST_RESERVATION_MAX_LIFETIME_SECONDS",
        default_value_t = 1800,
        global = true
    )]
    pub reservation_max_lifetime_seconds: u64,

    /// How often the expiry worker looks for expired reservations, in milliseconds.
    #[arg(
        long,
        env = "HOLDFAST_EXPIRY_INTERVAL_MS",
        default_value_t = 1000,
        global = true
    )]
    pub expiry_interval_ms: u64,

    /// Per-customer rate limit on checkout, complete and token calls (burst 2x); 0 = off.
    #[arg(
        long,
        env = "HOLDFAST_RATE_LIMIT_PER_SECOND",
        default_value_t = 20,
        global = true
    )]
    pub rate_limit_per_second: u32,

    /// A request's headers must arrive within this, and its answer follow within this again;
    /// a slower client gets `408` and the connection is closed.
    #[arg(
        long,
        env = "HOLDFAST_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub request_timeout_seconds: u64,

    /// How often the recovery worker looks for stalled checkouts, in milliseconds.
    #[arg(
        long,
        env = "HOLDFAST_RECOVERY_INTERVAL_MS",
        default_value_t = 1000,
        global = true
    )]
    pub recovery_interval_ms: u64,

    /// How long an instance owns a checkout it is charging before recovery may take over; a
    /// live instance renews it while the charge runs.
    #[arg(
        long,
        env = "HOLDFAST_LEASE_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub lease_seconds: u64,

    /// How long a checkout waits for customer authentication before the gateway is asked about
    /// it (lost webhooks), and how long a charge must be in flight before recovery searches the
    /// gateway for it.
    #[arg(
        long,
        env = "HOLDFAST_RECONCILE_AFTER_SECONDS",
        default_value_t = 60,
        global = true
    )]
    pub reconcile_after_seconds: u64,

    /// How long an outbox relay owns the events it claimed before another relay may publish
    /// them again (a relay that died mid-batch).
    #[arg(
        long,
        env = "HOLDFAST_RELAY_LEASE_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub relay_lease_seconds: u64,

    /// Test-only: stop at this saga fault point so a crash test can kill the process there.
    #[arg(long, env = "HOLDFAST_FAULT_POINT", global = true, hide = true)]
    pub fault_point: Option<String>,

    /// Seed a demo catalogue and a flash sale at start when the catalogue is empty.
    #[arg(
        long,
        env = "HOLDFAST_DEMO",
        global = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub demo: bool,

    /// Reserve concurrent checkouts together, one transaction and one commit per batch (on by
    /// default; `--group-reservations=false` reserves each checkout on its own).
    #[arg(
        long,
        env = "HOLDFAST_GROUP_RESERVATIONS",
        global = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_value = "true",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub group_reservations: bool,

    /// Most checkouts reserved in one group transaction (1 to 1000).
    #[arg(
        long,
        env = "HOLDFAST_GROUP_MAX_BATCH",
        default_value_t = 64,
        global = true
    )]
    pub group_max_batch: u64,

    /// How long a group batch waits for more checkouts after the queue is drained, in
    /// microseconds (at most 100000; 0 = not at all).
    #[arg(
        long,
        env = "HOLDFAST_GROUP_LINGER_US",
        default_value_t = 0,
        global = true
    )]
    pub group_linger_us: u64,

    /// When cards are charged: `automatic` (at checkout) or `manual` (authorized at checkout,
    /// captured by the shipments). Decided per checkout when it starts.
    #[arg(
        long,
        env = "HOLDFAST_CAPTURE_METHOD",
        default_value = "automatic",
        global = true
    )]
    pub capture_method: CaptureArg,

    /// Manual capture: an authorization older than this is settled by the authorization
    /// worker (what shipped is captured, the rest released) before the card network lets it
    /// lapse (7 days for most cards). Default 6 days.
    #[arg(
        long,
        env = "HOLDFAST_AUTHORIZATION_WINDOW_SECONDS",
        default_value_t = 518_400,
        global = true
    )]
    pub authorization_window_seconds: u64,

    /// Log format: `text` or `json`.
    #[arg(
        long,
        env = "HOLDFAST_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// A secret as given on the command line or in the environment. Its `Debug` hides it, so the
/// parsed flags can be printed or logged whole without leaking it (DESIGN §7).
#[derive(Clone)]
pub struct SecretArg(String);

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Ok(Self(raw.to_owned()))
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretArg([redacted])")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureArg {
    Automatic,
    Manual,
}

impl From<CaptureArg> for crate::domain::CaptureMethod {
    fn from(arg: CaptureArg) -> Self {
        match arg {
            CaptureArg::Automatic => Self::Automatic,
            CaptureArg::Manual => Self::Manual,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite { data_dir: PathBuf },
    Postgres { url: String, max_connections: u32 },
}

/// Validated settings; built only through [`Settings::from_flags`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    pub redis_url: Option<String>,
    pub redis_key_prefix: String,
    pub nats_url: Option<String>,
    pub nats_stream: String,
    pub nats_subject_prefix: String,
    pub admin_token: Option<SecretString>,
    pub stripe_secret_key: Option<SecretString>,
    pub stripe_api_base: Option<String>,
    /// The first signs nothing here; all are accepted on incoming webhooks (rotation).
    pub stripe_webhook_secrets: Vec<SecretString>,
    pub reservation_ttl: Duration,
    pub reservation_max_lifetime: Duration,
    pub expiry_interval: Duration,
    pub recovery_interval: Duration,
    pub lease: Duration,
    pub reconcile_after: Duration,
    pub relay_lease: Duration,
    pub fault_point: Option<crate::faults::FaultPoint>,
    pub relay_interval: Duration,
    pub rate_limit_per_second: u32,
    pub request_timeout: Duration,
    pub log_format: LogFormat,
    pub demo: bool,
    /// Group reservation (`--group-reservations`, `--group-max-batch`, `--group-linger-us`).
    pub group: GroupSettings,
    /// The shop-wide capture method (`--capture-method`).
    pub capture_method: crate::domain::CaptureMethod,
    /// Manual capture: how long an authorization is held before the worker settles it.
    pub authorization_window: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--database-url must be a postgres:// or postgresql:// URL (unset for the embedded SQLite store)")]
    DatabaseUrl,
    #[error("--{flag} must be a {scheme} URL")]
    Url {
        flag: &'static str,
        scheme: &'static str,
    },
    #[error("--{flag} must be between {min} and {max}")]
    Range {
        flag: &'static str,
        min: u64,
        max: u64,
    },
    #[error("--admin-token must be at least 16 characters")]
    AdminToken,
    #[error("--stripe-webhook-secret must not be empty")]
    WebhookSecret,
    #[error("--fault-point: {0}")]
    FaultPoint(String),
    #[error("--{flag} must be {what}")]
    NatsName {
        flag: &'static str,
        what: &'static str,
    },
}

impl Settings {
    pub fn from_flags(flags: &Flags) -> Result<Self, ConfigError> {
        let store = match &flags.database_url {
            None => StoreConfig::Sqlite {
                data_dir: flags.data_dir.clone(),
            },
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                StoreConfig::Postgres {
                    url: url.clone(),
                    max_connections: in_range(
                        "database-max-connections",
                        flags.database_max_connections.into(),
                        1,
                        1000,
                    )? as u32,
                }
            }
            Some(_) => return Err(ConfigError::DatabaseUrl),
        };
        check_scheme(
            flags.redis_url.as_deref(),
            "redis-url",
            &["redis://", "rediss://"],
            "redis://",
        )?;
        check_scheme(
            flags.nats_url.as_deref(),
            "nats-url",
            &["nats://", "tls://"],
            "nats://",
        )?;
        check_scheme(
            flags.stripe_api_base.as_deref(),
            "stripe-api-base",
            &["http://", "https://"],
            "http(s)://",
        )?;
        if flags.admin_token.as_ref().is_some_and(|t| t.0.len() < 16) {
            return Err(ConfigError::AdminToken);
        }
        let stripe_webhook_secrets: Vec<SecretString> = match &flags.stripe_webhook_secret {
            None => Vec::new(),
            Some(list) => {
                let secrets: Vec<&str> = list.0.split(',').map(str::trim).collect();
                if secrets.iter().any(|s| s.is_empty()) {
                    return Err(ConfigError::WebhookSecret);
                }
                secrets
                    .into_iter()
                    .map(|s| SecretString::from(s.to_owned()))
                    .collect()
            }
        };
        let fault_point = flags
            .fault_point
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(ConfigError::FaultPoint)?;
        let recovery = in_range(
            "recovery-interval-ms",
            flags.recovery_interval_ms,
            10,
            600_000,
        )?;
        let lease = in_range("lease-seconds", flags.lease_seconds, 1, 3600)?;
        let reconcile_after = in_range(
            "reconcile-after-seconds",
            flags.reconcile_after_seconds,
            1,
            86_400,
        )?;
        let relay_lease = in_range("relay-lease-seconds", flags.relay_lease_seconds, 1, 3600)?;
        let max_lifetime = in_range(
            "reservation-max-lifetime-seconds",
            flags.reservation_max_lifetime_seconds,
            1,
            86_400,
        )?;
        let ttl = in_range(
            "reservation-ttl-seconds",
            flags.reservation_ttl_seconds,
            1,
            max_lifetime,
        )?;
        let expiry = in_range("expiry-interval-ms", flags.expiry_interval_ms, 10, 600_000)?;
        let relay = in_range("relay-interval-ms", flags.relay_interval_ms, 10, 600_000)?;
        let request_timeout = in_range(
            "request-timeout-seconds",
            flags.request_timeout_seconds,
            1,
            3600,
        )?;
        check_nats_names(&flags.nats_stream, &flags.nats_subject_prefix)?;
        let group = GroupSettings {
            enabled: flags.group_reservations,
            max_batch: in_range("group-max-batch", flags.group_max_batch, 1, 1000)? as usize,
            linger: Duration::from_micros(in_range(
                "group-linger-us",
                flags.group_linger_us,
                0,
                100_000,
            )?),
        };
        Ok(Settings {
            listen: flags.listen,
            data_dir: flags.data_dir.clone(),
            store,
            redis_url: flags.redis_url.clone(),
            redis_key_prefix: flags.redis_key_prefix.clone(),
            nats_url: flags.nats_url.clone(),
            nats_stream: flags.nats_stream.clone(),
            nats_subject_prefix: flags.nats_subject_prefix.clone(),
            admin_token: flags.admin_token.clone().map(|t| SecretString::from(t.0)),
            stripe_secret_key: flags
                .stripe_secret_key
                .clone()
                .map(|k| SecretString::from(k.0)),
            stripe_api_base: flags.stripe_api_base.clone(),
            stripe_webhook_secrets,
            reservation_ttl: Duration::from_secs(ttl),
            reservation_max_lifetime: Duration::from_secs(max_lifetime),
            expiry_interval: Duration::from_millis(expiry),
            recovery_interval: Duration::from_millis(recovery),
            lease: Duration::from_secs(lease),
            reconcile_after: Duration::from_secs(reconcile_after),
            relay_lease: Duration::from_secs(relay_lease),
            fault_point,
            relay_interval: Duration::from_millis(relay),
            rate_limit_per_second: flags.rate_limit_per_second,
            request_timeout: Duration::from_secs(request_timeout),
            log_format: flags.log_format,
            demo: flags.demo,
            group,
            capture_method: flags.capture_method.into(),
            authorization_window: Duration::from_secs(in_range(
                "authorization-window-seconds",
                flags.authorization_window_seconds,
                1,
                7 * 24 * 3600,
            )?),
        })
    }
}

/// clap's message for a command line it could not parse, as one line (the start-up contract:
/// one clear line, exit 2): its first paragraph, which holds the error and any list of
/// possible values, without the `error: ` label, the tips and the usage that follow.
pub fn error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let paragraph: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let line = paragraph.join(" ");
    match line.strip_prefix("error: ") {
        Some(rest) => rest.to_owned(),
        None if line.is_empty() => "invalid command line".to_owned(),
        None => line,
    }
}

fn in_range(flag: &'static str, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Range { flag, min, max })
    }
}

fn check_scheme(
    url: Option<&str>,
    flag: &'static str,
    allowed: &[&str],
    scheme: &'static str,
) -> Result<(), ConfigError> {
    match url {
        Some(u) if !allowed.iter().any(|p| u.starts_with(p)) => {
            Err(ConfigError::Url { flag, scheme })
        }
        _ => Ok(()),
    }
}

/// A JetStream stream name is one token; a subject prefix is dot-separated tokens. Neither may
/// hold wildcards or white space, which would widen what the stream captures.
fn check_nats_names(stream: &str, prefix: &str) -> Result<(), ConfigError> {
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| !c.is_whitespace() && !matches!(c, '.' | '*' | '>' | '/' | '\\'))
    };
    if !token_ok(stream) || stream.len() > 255 {
        return Err(ConfigError::NatsName {
            flag: "nats-stream",
            what: "a name without spaces, '.', '*', '>', '/' or '\\'",
        });
    }
    if !prefix.split('.').all(token_ok) {
        return Err(ConfigError::NatsName {
            flag: "nats-subject-prefix",
            what: "dot-separated names without spaces, '*' or '>'",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, ConfigError> {
        let mut all = vec!["holdfast"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).expect("flags parse");
        Settings::from_flags(&cli.flags)
    }

    #[test]
    fn printing_the_flags_or_the_settings_shows_no_secret() {
        let cli = Cli::try_parse_from([
            "holdfast",
            "--admin-token",
            "admin-secret-0123456789",
            "--stripe-secret-key",
            "sk_test_secret_0123",
            "--stripe-webhook-secret",
            "whsec_secret_0123",
        ])
        .expect("flags parse");
        let settings = Settings::from_flags(&cli.flags).expect("valid settings");
        let printed = format!("{cli:?} {settings:?}");
        for secret in ["admin-secret", "sk_test_secret", "whsec_secret"] {
            assert!(!printed.contains(secret), "{secret} printed in {printed}");
        }
    }

    #[test]
    fn a_flag_clap_cannot_parse_is_told_in_one_line() {
        for args in [
            vec!["holdfast", "--listen", "not-an-address"],
            vec!["holdfast", "--no-such-flag"],
            vec!["holdfast", "--rate-limit-per-second", "-5"],
            vec!["holdfast", "audit", "extra"],
        ] {
            let e = Cli::try_parse_from(&args).expect_err("a bad command line");
            let line = error_line(&e);
            assert!(
                !line.contains('\n') && !line.is_empty(),
                "{args:?}: {line:?}"
            );
            assert!(!line.starts_with("error:"), "{args:?}: {line:?}");
            assert!(!line.contains("Usage"), "{args:?}: {line:?}");
        }
        let e = Cli::try_parse_from(["holdfast", "--listen", "nope"]).expect_err("bad address");
        assert!(error_line(&e).contains("--listen"), "{}", error_line(&e));
        let e = Cli::try_parse_from(["holdfast", "--log-format", "xml"]).expect_err("bad format");
        assert!(error_line(&e).contains("text, json"), "{}", error_line(&e));
    }

    #[test]
    fn no_flags_means_the_embedded_store_on_port_8080() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert!(matches!(s.store, StoreConfig::Sqlite { .. }));
        assert_eq!(s.reservation_ttl, Duration::from_secs(180));
        assert_eq!(s.rate_limit_per_second, 20);
        assert_eq!(s.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_request_timeout_of_zero_or_over_an_hour_is_rejected() {
        for bad in ["0", "3601"] {
            assert!(
                matches!(
                    parse(&["--request-timeout-seconds", bad]),
                    Err(ConfigError::Range { .. })
                ),
                "{bad}"
            );
        }
        let s = parse(&[
            "--request-timeout-seconds",
            "1",
            "--rate-limit-per-second",
            "0",
        ])
        .unwrap();
        assert_eq!(
            (s.request_timeout, s.rate_limit_per_second),
            (Duration::from_secs(1), 0)
        );
    }

    #[test]
    fn reconciliation_and_relay_leases_default_to_a_minute_and_half_a_minute() {
        let s = parse(&[]).unwrap();
        assert_eq!(
            (s.reconcile_after, s.relay_lease),
            (Duration::from_secs(60), Duration::from_secs(30))
        );
        let s = parse(&[
            "--reconcile-after-seconds",
            "1",
            "--relay-lease-seconds",
            "2",
        ])
        .unwrap();
        assert_eq!(
            (s.reconcile_after, s.relay_lease),
            (Duration::from_secs(1), Duration::from_secs(2))
        );
        for flag in ["--reconcile-after-seconds", "--relay-lease-seconds"] {
            assert!(
                matches!(parse(&[flag, "0"]), Err(ConfigError::Range { .. })),
                "{flag} 0"
            );
        }
    }

    #[test]
    fn group_reservation_is_on_by_default_and_its_limits_are_checked() {
        assert_eq!(parse(&[]).unwrap().group, GroupSettings::default());
        assert!(GroupSettings::default().enabled);
        assert!(parse(&["--group-reservations"]).unwrap().group.enabled);
        assert!(
            !parse(&["--group-reservations=false"])
                .unwrap()
                .group
                .enabled
        );
        assert!(parse(&["--group-reservations=true"]).unwrap().group.enabled);
        let s = parse(&[
            "--group-reservations",
            "--group-max-batch",
            "1000",
            "--group-linger-us",
            "100000",
        ])
        .unwrap();
        assert_eq!(
            s.group,
            GroupSettings {
                enabled: true,
                max_batch: 1000,
                linger: Duration::from_millis(100),
            }
        );
        for bad in [
            vec!["--group-max-batch", "0"],
            vec!["--group-max-batch", "1001"],
            vec!["--group-linger-us", "100001"],
        ] {
            assert!(
                matches!(parse(&bad), Err(ConfigError::Range { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn demo_mode_is_off_unless_asked_for() {
        assert!(!parse(&[]).unwrap().demo);
        assert!(parse(&["--demo"]).unwrap().demo);
        assert!(parse(&["serve", "--demo"]).unwrap().demo);
    }

    #[test]
    fn a_database_url_that_is_not_postgres_is_rejected() {
        assert!(matches!(
            parse(&["--database-url", "mysql://x"]),
            Err(ConfigError::DatabaseUrl)
        ));
        assert!(matches!(
            parse(&["--database-url", "postgres://root@127.0.0.1/test"])
                .unwrap()
                .store,
            StoreConfig::Postgres { .. }
        ));
    }

    #[test]
    fn a_ttl_longer_than_the_maximum_lifetime_is_rejected() {
        assert!(matches!(
            parse(&["--reservation-ttl-seconds", "4000"]),
            Err(ConfigError::Range { .. })
        ));
        assert!(matches!(
            parse(&["--reservation-ttl-seconds", "0"]),
            Err(ConfigError::Range { .. })
        ));
    }

    #[test]
    fn a_short_admin_token_and_odd_urls_are_rejected() {
        assert!(matches!(
            parse(&["--admin-token", "short"]),
            Err(ConfigError::AdminToken)
        ));
        assert!(matches!(
            parse(&["--redis-url", "http://x"]),
            Err(ConfigError::Url { .. })
        ));
        assert!(matches!(
            parse(&["--nats-url", "x"]),
            Err(ConfigError::Url { .. })
        ));
    }

    #[test]
    fn nats_names_default_to_the_production_stream_and_refuse_wildcards() {
        let s = parse(&[]).unwrap();
        assert_eq!(
            (s.nats_stream.as_str(), s.nats_subject_prefix.as_str()),
            ("HOLDFAST_ORDERS", "holdfast")
        );
        let ok = parse(&[
            "--nats-stream",
            "hf_test_1",
            "--nats-subject-prefix",
            "shop.eu",
        ]);
        assert!(ok.is_ok());
        for bad in [
            vec!["--nats-stream", "a.b"],
            vec!["--nats-stream", ""],
            vec!["--nats-stream", "a b"],
            vec!["--nats-subject-prefix", "shop.*"],
            vec!["--nats-subject-prefix", "shop."],
            vec!["--nats-subject-prefix", ">"],
        ] {
            assert!(
                matches!(parse(&bad), Err(ConfigError::NatsName { .. })),
                "{bad:?}"
            );
        }
    }
}
