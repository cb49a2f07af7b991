//! Wiring: the only module that names concrete stores. Opens the store, resolves secrets,
//! binds the listener, builds the router and starts the workers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::brokers::{connect_with_backoff, Broker, Brokers, LateGate, LateSink};
use crate::checkout::{CheckoutService, SagaSettings, Windows};
use crate::config::{Settings, StoreConfig};
use crate::domain::{Clock, SystemClock};
use crate::flash_sale::{AdmissionGate, InProcessGate, RedisGate};
use crate::http::{self, AppState};
use crate::outbox::{EventSink, InProcessSink, NatsConsumers, NatsSink, Relay, SinkError};
use crate::payments::{PaymentGateway, StripeGateway, StripeSimulator, Timeouts};
use crate::store::{PgStore, SqliteStore, Store, StoreError};
use crate::workers::{ExpiryWorker, RecoveryWorker};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    // Not a `#[source]` (nor `#[from]`, which implies it): main prints the error chain, and
    // the cause is already in the line.
    #[error("cannot open the store: {0}")]
    Store(StoreError),
    #[error("no database at {}; run `holdfast migrate` first", .0.display())]
    NoDatabase(PathBuf),
    #[error("cannot use the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set up the payment gateway: {0}")]
    Gateway(String),
    #[error("cannot reach the flash-sale gate: {0}")]
    Gate(crate::flash_sale::GateError),
    // Not a `#[source]`: main prints the error chain, and the cause is already in the line.
    #[error("cannot set up fulfilment events: {0}")]
    Events(SinkError),
}

impl From<StoreError> for StartupError {
    fn from(e: StoreError) -> Self {
        StartupError::Store(e)
    }
}

/// Opens the configured store and applies its migrations.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartupError> {
    match &settings.store {
        StoreConfig::Sqlite { data_dir } => {
            ensure_dir(data_dir)?;
            let store = SqliteStore::open(data_dir).await?;
            store.migrate().await?;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres {
            url,
            max_connections,
        } => {
            let store = PgStore::connect(url, *max_connections).await?;
            store.migrate().await?;
            Ok(Arc::new(store))
        }
    }
}

/// Opens the configured store as it is, for reading a live database (`holdfast audit`, the
/// load generator's audit): nothing is created or migrated behind the operator's back, and a
/// schema behind this binary's migrations is an error that says to run `holdfast migrate`.
pub async fn open_existing_store(settings: &Settings) -> Result<Arc<dyn Store>, StartupError> {
    match &settings.store {
        StoreConfig::Sqlite { data_dir } => {
            let file = SqliteStore::file_in(data_dir);
            if !file.is_file() {
                return Err(StartupError::NoDatabase(file));
            }
            let store = SqliteStore::open_existing(data_dir).await?;
            store.check_migrated().await?;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres {
            url,
            max_connections,
        } => {
            let store = PgStore::connect(url, *max_connections).await?;
            store.check_migrated().await?;
            Ok(Arc::new(store))
        }
    }
}

fn ensure_dir(dir: &Path) -> Result<(), StartupError> {
    std::fs::create_dir_all(dir).map_err(|source| StartupError::DataDir {
        path: dir.to_owned(),
        source,
    })
}

/// A secret from its flag, or read from `<data-dir>/<file>`, or generated once into it
/// (owner-only permissions). Returns the secret and where it came from, for the start-up log.
fn resolve_secret(
    given: Option<&SecretString>,
    data_dir: &Path,
    file: &str,
    prefix: &str,
) -> Result<(SecretString, String), StartupError> {
    if let Some(secret) = given {
        return Ok((secret.clone(), "flag/environment".to_owned()));
    }
    let path = data_dir.join(file);
    let io_err = |source| StartupError::DataDir {
        path: path.clone(),
        source,
    };
    ensure_dir(data_dir)?;
    match std::fs::read_to_string(&path) {
        Ok(existing) if !existing.trim().is_empty() => {
            return Ok((
                SecretString::from(existing.trim().to_owned()),
                path.display().to_string(),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let secret = format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    write_private(&path, &secret).map_err(io_err)?;
    Ok((SecretString::from(secret), path.display().to_string()))
}

fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// The relay's sink and, in the production shape, the NATS consumers: `--nats-url` unset
/// means the embedded shape's in-process consumers (DESIGN §1). A NATS that cannot be reached
/// leaves the sink unplugged and a reconnect in `pending`; a URL that does not parse is an
/// error.
async fn events(
    settings: &Settings,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    brokers: &mut Brokers,
    pending: &mut Vec<Reconnect>,
) -> Result<(Arc<dyn EventSink>, Option<Arc<NatsConsumers>>), StartupError> {
    let Some(url) = &settings.nats_url else {
        return Ok((Arc::new(InProcessSink::new(store, clock)), None));
    };
    NatsSink::check_url(url).map_err(StartupError::Events)?;
    let broker = Broker::new("nats");
    brokers.push(broker.clone());
    let sink = Arc::new(LateSink::new(broker.clone()));
    let nats = NatsTarget {
        url: url.clone(),
        stream: settings.nats_stream.clone(),
        prefix: settings.nats_subject_prefix.clone(),
        store,
        clock,
    };
    match nats.connect().await {
        Ok((connected, consumers)) => {
            sink.set(connected);
            Ok((sink, Some(consumers)))
        }
        Err(e) => {
            tracing::warn!(error = %e, "NATS is unreachable: starting degraded, events wait in the outbox");
            broker.mark_down(e.to_string());
            pending.push(Reconnect::Nats {
                nats,
                sink: sink.clone(),
                broker,
            });
            Ok((sink, None))
        }
    }
}

/// What the NATS side needs to connect, at start or later.
struct NatsTarget {
    url: String,
    stream: String,
    prefix: String,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl NatsTarget {
    async fn connect(&self) -> Result<(Arc<dyn EventSink>, Arc<NatsConsumers>), SinkError> {
        let sink = NatsSink::connect(&self.url, &self.stream, &self.prefix).await?;
        let consumers = NatsConsumers::new(
            sink.jetstream().clone(),
            &self.stream,
            &self.prefix,
            self.store.clone(),
            self.clock.clone(),
        )
        .await?;
        tracing::info!(
            "fulfilment events go to NATS stream {} as {}.<topic>",
            self.stream,
            self.prefix
        );
        Ok((Arc::new(sink), Arc::new(consumers)))
    }
}

/// The flash-sale gate: Redis when `--redis-url` is set, else in process. A Redis that cannot
/// be reached leaves the gate refusing and a reconnect in `pending`; a URL that does not parse
/// is an error.
async fn gate(
    settings: &Settings,
    brokers: &mut Brokers,
    pending: &mut Vec<Reconnect>,
) -> Result<Arc<dyn AdmissionGate>, StartupError> {
    let Some(url) = &settings.redis_url else {
        return Ok(Arc::new(InProcessGate::new()));
    };
    RedisGate::check_url(url).map_err(StartupError::Gate)?;
    let broker = Broker::new("redis");
    brokers.push(broker.clone());
    let gate = Arc::new(LateGate::new("redis", broker.clone()));
    match RedisGate::connect(url, settings.redis_key_prefix.clone()).await {
        Ok(connected) => gate.set(Arc::new(connected)),
        Err(e) => {
            tracing::warn!(error = %e, "Redis is unreachable: starting degraded, flash sales answer 503");
            broker.mark_down(e.to_string());
            pending.push(Reconnect::Redis {
                url: url.clone(),
                key_prefix: settings.redis_key_prefix.clone(),
                gate: gate.clone(),
                broker,
            });
        }
    }
    Ok(gate)
}

/// A broker the start could not reach, connected by `run_until_stopped` with bounded backoff.
enum Reconnect {
    Redis {
        url: String,
        key_prefix: String,
        gate: Arc<LateGate>,
        broker: Arc<Broker>,
    },
    Nats {
        nats: NatsTarget,
        sink: Arc<LateSink>,
        broker: Arc<Broker>,
    },
}

impl Reconnect {
    /// Connects, plugs the broker in and, for NATS, runs the consumers until `stop` when
    /// `consume` says so.
    async fn run(self, stop: CancellationToken, consume: bool) {
        match self {
            Reconnect::Redis {
                url,
                key_prefix,
                gate,
                broker,
            } => {
                let connected = connect_with_backoff(&broker, &stop, || {
                    let (url, key_prefix) = (url.clone(), key_prefix.clone());
                    async move {
                        RedisGate::connect(&url, key_prefix)
                            .await
                            .map_err(|e| e.to_string())
                    }
                })
                .await;
                if let Some(connected) = connected {
                    gate.set(Arc::new(connected));
                }
            }
            Reconnect::Nats { nats, sink, broker } => {
                let connected = connect_with_backoff(&broker, &stop, || async {
                    nats.connect().await.map_err(|e| e.to_string())
                })
                .await;
                let Some((connected, consumers)) = connected else {
                    return;
                };
                sink.set(connected);
                if consume {
                    let _ = consumers.spawn(stop).await;
                }
            }
        }
    }
}

/// Knobs tests may turn; production uses the defaults.
#[derive(Clone)]
pub struct Overrides {
    pub clock: Arc<dyn Clock>,
    /// Run background workers (tests that drive `tick()` themselves switch them off).
    pub workers: bool,
    /// Pacing of the saga (tests shorten retries).
    pub saga: Option<SagaSettings>,
}

impl Default for Overrides {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            workers: true,
            saga: None,
        }
    }
}

/// The Stripe API when a secret key is configured, else the test-mode simulator.
pub fn payment_gateway(
    settings: &Settings,
) -> Result<(Arc<dyn PaymentGateway>, Option<StripeSimulator>), StartupError> {
    match &settings.stripe_secret_key {
        Some(key) => {
            let base = settings
                .stripe_api_base
                .as_deref()
                .unwrap_or(crate::payments::stripe::DEFAULT_API_BASE);
            let gateway = StripeGateway::new(key.clone(), base, Timeouts::default())
                .map_err(|e| StartupError::Gateway(e.to_string()))?;
            Ok((Arc::new(gateway), None))
        }
        None => {
            let simulator = StripeSimulator::new();
            Ok((Arc::new(simulator.clone()), Some(simulator)))
        }
    }
}

pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    state: AppState,
    expiry: Arc<ExpiryWorker>,
    recovery: Arc<RecoveryWorker>,
    simulator: Option<StripeSimulator>,
    relay: Arc<Relay>,
    consumers: Option<Arc<NatsConsumers>>,
    /// Brokers the start could not reach: connected in the background once serving.
    pending: Vec<Reconnect>,
    settings: Settings,
    workers: bool,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        Self::build_with(settings, Overrides::default()).await
    }

    pub async fn build_with(
        settings: Settings,
        overrides: Overrides,
    ) -> Result<Self, StartupError> {
        let store = open_store(&settings).await?;
        if settings.demo {
            let seeded = crate::demo::seed(store.as_ref(), overrides.clock.now()).await?;
            tracing::info!(
                products = seeded.products,
                flash_sale = seeded.flash_sale,
                company = ?seeded.company.map(|c| c.to_string()),
                "demo catalogue"
            );
        }
        let (admin_token, admin_source) = resolve_secret(
            settings.admin_token.as_ref(),
            &settings.data_dir,
            "admin-token",
            "hfa_",
        )?;
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: settings.listen,
            source,
        })?;
        let webhook_secrets = if settings.stripe_webhook_secrets.is_empty() {
            let (secret, _) = resolve_secret(None, &settings.data_dir, "webhook-secret", "whsec_")?;
            vec![secret]
        } else {
            settings.stripe_webhook_secrets.clone()
        };
        let (gateway, simulator) = payment_gateway(&settings)?;
        if let Some(simulator) = &simulator {
            // The simulator delivers its signed events to our own webhook endpoint, so the
            // embedded shape exercises the same path as production.
            let host = if addr.ip().is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                addr.ip()
            };
            let target = SocketAddr::new(host, addr.port());
            simulator.set_webhook_target(
                format!("http://{target}/webhooks/stripe"),
                webhook_secrets[0].clone(),
            );
        }
        let clock = overrides.clock;
        let saga = overrides.saga.unwrap_or_else(|| SagaSettings {
            lease: chrono::Duration::from_std(settings.lease)
                .unwrap_or(chrono::Duration::seconds(30)),
            reconcile_after: chrono::Duration::from_std(settings.reconcile_after)
                .unwrap_or(chrono::Duration::seconds(60)),
            fault: settings.fault_point,
            ..SagaSettings::default()
        });
        let mut brokers = Brokers::default();
        let mut pending = Vec::new();
        let gate = gate(&settings, &mut brokers, &mut pending).await?;
        let (sink, consumers) = events(
            &settings,
            store.clone(),
            clock.clone(),
            &mut brokers,
            &mut pending,
        )
        .await?;
        let relay = Arc::new(
            Relay::new(store.clone(), sink, clock.clone())
                .with_lease(
                    chrono::Duration::from_std(settings.relay_lease)
                        .unwrap_or(chrono::Duration::seconds(30)),
                )
                .with_fault(settings.fault_point),
        );
        let windows = Windows {
            ttl: chrono::Duration::from_std(settings.reservation_ttl)
                .unwrap_or(chrono::Duration::seconds(180)),
            max_lifetime: chrono::Duration::from_std(settings.reservation_max_lifetime)
                .unwrap_or(chrono::Duration::minutes(30)),
        };
        let checkout = Arc::new(
            CheckoutService::new(store.clone(), clock.clone(), gateway, gate, windows, saga)
                .with_grouping(&settings.group)
                .with_capture_method(settings.capture_method)
                .with_authorization_window(
                    chrono::Duration::from_std(settings.authorization_window)
                        .unwrap_or(chrono::Duration::days(6)),
                ),
        );
        let mut rate_limit = http::RateLimit::per_second(settings.rate_limit_per_second);
        if let Some(url) = &settings.redis_url {
            // Shared by every instance on this Redis and prefix.
            rate_limit = rate_limit
                .shared_through(url, &settings.redis_key_prefix)
                .map_err(|e| StartupError::Gate(crate::flash_sale::GateError::Unavailable(e)))?;
        }
        let catalogue = Arc::new(http::Catalogue::default());
        if let Err(e) = catalogue.load(store.as_ref()).await {
            // Served from the store until a reload succeeds.
            tracing::warn!(error = %e, "catalogue snapshot not loaded yet");
        }
        catalogue.spawn_refresher(store.clone());
        checkout.load_current_sales().await;
        let state = AppState {
            catalogue,
            store: store.clone(),
            checkout: checkout.clone(),
            webhook_secrets: Arc::new(webhook_secrets),
            max_lifetime: windows.max_lifetime,
            customers: Arc::default(),
            company_prices: Arc::default(),
            clock: clock.clone(),
            admin_token_digest: http::token_digest(admin_token.expose_secret()),
            rate_limit: Arc::new(rate_limit),
            request_timeout: settings.request_timeout,
            simulator: simulator.clone(),
            brokers,
        };
        tracing::info!(
            "holdfast listening on http://{addr} (store: {}, admin token: {admin_source}); \
             storefront at /, operations at /ops",
            store.kind().as_str()
        );
        Ok(Self {
            listener,
            addr,
            expiry: Arc::new(ExpiryWorker::new(store, clock).with_admissions(checkout.clone())),
            recovery: Arc::new(RecoveryWorker::new(checkout)),
            simulator,
            relay,
            consumers,
            pending,
            state,
            settings,
            workers: overrides.workers,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    pub fn expiry_worker(&self) -> Arc<ExpiryWorker> {
        self.expiry.clone()
    }

    /// The payment gateway the saga charges through.
    pub fn gateway(&self) -> Arc<dyn PaymentGateway> {
        self.state.checkout.gateway()
    }

    pub fn recovery_worker(&self) -> Arc<RecoveryWorker> {
        self.recovery.clone()
    }

    /// The built-in gateway, when no Stripe key is configured.
    pub fn simulator(&self) -> Option<StripeSimulator> {
        self.simulator.clone()
    }

    pub fn relay(&self) -> Arc<Relay> {
        self.relay.clone()
    }

    /// The router with its layers and state, for driving requests in process.
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// The NATS consumers, when `--nats-url` is set and NATS answered at start (a NATS that
    /// comes later gets its consumers from the reconnect loop, not here).
    pub fn nats_consumers(&self) -> Option<Arc<NatsConsumers>> {
        self.consumers.clone()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish and stops the
    /// workers.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for reconnect in self.pending {
            workers.push(tokio::spawn(reconnect.run(stop.clone(), self.workers)));
        }
        if self.workers {
            workers.push(tokio::spawn(
                self.expiry
                    .clone()
                    .run_until_stopped(self.settings.expiry_interval, stop.clone()),
            ));
            workers.push(tokio::spawn(
                self.recovery
                    .clone()
                    .run_until_stopped(self.settings.recovery_interval, stop.clone()),
            ));
            workers.push(tokio::spawn(
                self.relay
                    .clone()
                    .run_until_stopped(self.settings.relay_interval, stop.clone()),
            ));
            if let Some(consumers) = &self.consumers {
                workers.push(consumers.clone().spawn(stop.clone()));
            }
        }
        let router = http::router(self.state);
        let served = http::serve(
            self.listener,
            router,
            self.settings.request_timeout,
            shutdown,
        )
        .await;
        stop.cancel();
        for worker in workers {
            let _ = worker.await;
        }
        tracing::info!("holdfast stopped");
        served
    }
}
