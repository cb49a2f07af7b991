//! The production shape's events (DESIGN §1: outbox relayed to NATS JetStream), promise 5.
//!
//! [`NatsSink`] publishes each outbox event to `<prefix>.<topic>` on a JetStream stream with
//! `Nats-Msg-Id` set to the event id and waits for the stream's ack, so the relay marks a row
//! published only once the broker holds it. The stream's duplicate window drops a second
//! publish of the same event (a relay that crashed between publish and mark).
//!
//! [`NatsConsumers`] runs the shipped consumers as durable pull consumers. A message is acked
//! only after the consumer's store write; anything unacked is redelivered, and the consumer's
//! event-id record turns the redelivery into a no-op.
//!
//! Stream, subject prefix and consumer names are parameters, so parallel test runs never
//! share a stream.

use std::future::IntoFuture as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::Publish, stream, AckKind};
use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::Clock;
use crate::store::{OutboxEvent, Store};

use super::consumers::{Consumer, Notification, Warehouse};
use super::{EventSink, OrderPaid, SinkError};

/// How long the stream remembers a `Nats-Msg-Id`: well beyond the relay's lease, so a row
/// republished after a crashed relay's lease ran out is still recognised by the broker.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long the sink waits for the stream to confirm a publish.
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a consumer may hold a message before NATS redelivers it.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Pause before a consumer retries a failed store write or reopens its message stream.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Longest pause between two attempts to reconnect (async-nats waits up to 4 s by default):
/// the relay's backlog follows the broker's return within about this long.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// At once, then 100 ms more per failed attempt, up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    let step = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
    Duration::from_millis(100)
        .saturating_mul(step)
        .min(MAX_RECONNECT_DELAY)
}

pub struct NatsSink {
    jetstream: jetstream::Context,
    subject_prefix: String,
}

impl NatsSink {
    /// Connects (failing fast when the server cannot be reached) and creates the stream
    /// `stream` over `<subject_prefix>.>` unless it exists.
    pub async fn connect(url: &str, stream: &str, subject_prefix: &str) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .name("holdfast")
            .connection_timeout(Duration::from_secs(5))
            .reconnect_delay_callback(reconnect_delay)
            .connect(url)
            .await
            // The URL may carry credentials: the error names the failure, not the URL.
            .map_err(|e| SinkError::Unavailable(format!("cannot connect to NATS: {e}")))?;
        Self::with_client(client, stream, subject_prefix).await
    }

    /// Whether `url` (one server or a comma-separated list) parses as NATS server addresses,
    /// without connecting: a start-up with a bad URL fails, one with an unreachable NATS
    /// starts degraded.
    pub fn check_url(url: &str) -> Result<(), SinkError> {
        for server in url.split(',') {
            server
                .trim()
                .parse::<async_nats::ServerAddr>()
                // The URL may carry credentials: the error names the failure, not the URL.
                .map_err(|e| SinkError::Unavailable(format!("the NATS URL is not valid: {e}")))?;
        }
        Ok(())
    }

    pub async fn with_client(
        client: async_nats::Client,
        stream: &str,
        subject_prefix: &str,
    ) -> Result<Self, SinkError> {
        let jetstream = jetstream::new(client);
        ensure_stream(&jetstream, stream, subject_prefix).await?;
        Ok(Self {
            jetstream,
            subject_prefix: subject_prefix.to_owned(),
        })
    }

    /// The JetStream context, for the consumers to share the connection.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.subject_prefix)
    }
}

/// Creates the stream if it does not exist; an existing stream is used as it is.
async fn ensure_stream(
    jetstream: &jetstream::Context,
    name: &str,
    subject_prefix: &str,
) -> Result<stream::Stream, SinkError> {
    jetstream
        .get_or_create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{subject_prefix}.>")],
            duplicate_window: DUPLICATE_WINDOW,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| SinkError::Unavailable(format!("cannot open stream {name}: {e}")))
}

#[async_trait]
impl EventSink for NatsSink {
    #[tracing::instrument(skip_all, fields(event_id = %event.event_id, topic = %event.topic))]
    async fn publish(&self, event: &OutboxEvent) -> Result<(), SinkError> {
        if event.topic == OrderPaid::TOPIC {
            // Never ship what our own consumers would reject: the row stays, and is loud.
            OrderPaid::from_outbox(event)?;
        }
        let message = Publish::build()
            .payload(event.payload.clone().into())
            .message_id(event.event_id.to_string());
        let ack = self
            .jetstream
            .send_publish(self.subject(&event.topic), message)
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))?;
        let ack = tokio::time::timeout(PUBLISH_ACK_TIMEOUT, ack.into_future())
            .await
            .map_err(|_| SinkError::Timeout(PUBLISH_ACK_TIMEOUT))?
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::TimedOut => {
                    SinkError::Timeout(PUBLISH_ACK_TIMEOUT)
                }
                _ => SinkError::Unavailable(e.to_string()),
            })?;
        if ack.duplicate {
            tracing::debug!(
                sequence = ack.sequence,
                "the stream already held this event"
            );
        }
        Ok(())
    }
}

/// What one durable consumer did since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Messages whose effect was recorded now.
    pub recorded: u64,
    /// Redeliveries (or republished events) found already recorded, and acked.
    pub duplicates: u64,
    /// Store writes that failed; the message was handed back for a retry.
    pub retried: u64,
    /// Payloads that are not a valid event, terminated without a retry.
    pub rejected: u64,
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DeliveryStats {
        DeliveryStats {
            recorded: self.recorded.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// One shipped consumer behind its durable pull consumer.
struct Lane {
    consumer: Box<dyn Consumer>,
    counters: Counters,
}

/// The shipped consumers (`warehouse`, `notification`) as durable pull consumers on a stream.
pub struct NatsConsumers {
    jetstream: jetstream::Context,
    stream: String,
    subject_prefix: String,
    lanes: Vec<Lane>,
}

impl NatsConsumers {
    /// Makes sure the stream and both durable consumers exist, so a failure shows at start-up.
    pub async fn new(
        jetstream: jetstream::Context,
        stream: &str,
        subject_prefix: &str,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SinkError> {
        let this = Self {
            jetstream,
            stream: stream.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
            lanes: vec![
                Lane {
                    consumer: Box::new(Warehouse::new(store.clone(), clock.clone())),
                    counters: Counters::default(),
                },
                Lane {
                    consumer: Box::new(Notification::new(store, clock)),
                    counters: Counters::default(),
                },
            ],
        };
        for lane in &this.lanes {
            this.open_consumer(lane).await?;
        }
        Ok(this)
    }

    /// Durable names of the consumers, in the order they run.
    pub fn names(&self) -> Vec<&'static str> {
        self.lanes.iter().map(|l| l.consumer.name()).collect()
    }

    /// What the consumer named `name` did since start.
    pub fn stats(&self, name: &str) -> Option<DeliveryStats> {
        self.lanes
            .iter()
            .find(|l| l.consumer.name() == name)
            .map(|l| l.counters.snapshot())
    }

    /// Runs every consumer until `stop`; a message being handled is finished first.
    pub fn spawn(self: Arc<Self>, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let loops = (0..self.lanes.len()).map(|i| self.consume(i, stop.clone()));
            futures::future::join_all(loops).await;
        })
    }

    /// Gets (creating if needed) the stream and this lane's durable pull consumer. Done again
    /// whenever the message stream has to be reopened, so a broker that lost its state is
    /// set up afresh.
    async fn open_consumer(&self, lane: &Lane) -> Result<consumer::PullConsumer, SinkError> {
        let stream = ensure_stream(&self.jetstream, &self.stream, &self.subject_prefix).await?;
        let name = lane.consumer.name();
        stream
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    filter_subject: format!("{}.{}", self.subject_prefix, OrderPaid::TOPIC),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| SinkError::Unavailable(format!("cannot open consumer {name}: {e}")))
    }

    async fn consume(&self, index: usize, stop: CancellationToken) {
        let lane = &self.lanes[index];
        let name = lane.consumer.name();
        loop {
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                opened = self.open_messages(lane) => opened,
            };
            let mut messages = match opened {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot pull messages; retrying");
                    if pause(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => self.deliver(lane, message).await,
                    Some(Err(e)) => {
                        // Unacked messages come back after ACK_WAIT: reopening loses nothing.
                        tracing::warn!(consumer = name, error = %e, "message stream failed; reopening");
                        break;
                    }
                    None => break,
                }
            }
            if pause(&stop).await {
                return;
            }
        }
    }

    async fn open_messages(&self, lane: &Lane) -> Result<consumer::pull::Stream, SinkError> {
        self.open_consumer(lane)
            .await?
            .stream()
            .max_messages_per_batch(64)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))
    }

    /// Runs the consumer, then acks: the ack follows the durable write, never precedes it.
    async fn deliver(&self, lane: &Lane, message: jetstream::Message) {
        let name = lane.consumer.name();
        let event = match OrderPaid::from_payload(&message.payload) {
            Ok(event) => event,
            Err(e) => {
                // No retry can fix it; keep it out of the way and make it loud.
                tracing::error!(consumer = name, subject = %message.subject, error = %e,
                    "terminating a malformed event");
                lane.counters.rejected.fetch_add(1, Ordering::Relaxed);
                settle(&message, AckKind::Term, name).await;
                return;
            }
        };
        match lane.consumer.handle(&event).await {
            Ok(recorded) => {
                let counter = if recorded {
                    &lane.counters.recorded
                } else {
                    tracing::debug!(consumer = name, event_id = %event.event_id,
                        "event already handled");
                    &lane.counters.duplicates
                };
                counter.fetch_add(1, Ordering::Relaxed);
                settle(&message, AckKind::Ack, name).await;
            }
            Err(e) => {
                tracing::warn!(consumer = name, event_id = %event.event_id, error = %e,
                    "cannot record the event; it will be redelivered");
                lane.counters.retried.fetch_add(1, Ordering::Relaxed);
                settle(&message, AckKind::Nak(Some(RETRY_DELAY)), name).await;
            }
        }
    }
}

/// Acks, naks or terminates. A lost ack only means a redelivery, which the consumer absorbs.
async fn settle(message: &jetstream::Message, kind: AckKind, consumer: &'static str) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(consumer, error = %e, "cannot settle a message; it will be redelivered");
    }
}

/// Waits `RETRY_DELAY`; true when `stop` came first.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(RETRY_DELAY) => false,
    }
}
