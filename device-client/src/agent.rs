//! The device agent: keeps a session to the broker, publishes telemetry and reported state,
//! runs commands through the embedding program's handler and acknowledges them.
//!
//! Three tasks:
//! - the *driver* owns the MQTT event loop and is the only one polling it, so a poll is never
//!   cancelled mid-write. After a lost connection it waits until the agent has taken back its
//!   unacknowledged messages, discards everything the client still queued, sleeps the backoff
//!   and reconnects;
//! - the *agent* owns all state (offline buffer, outbox, reported state) and submits publishes
//!   only while it knows the session is up;
//! - the *command worker* runs the handler, one command at a time, in arrival order.
//!
//! Invariant: every QoS 1 publish submitted is in the outbox until its PUBACK, and goes back to
//! its queue when the session is lost, so nothing is lost by a reconnect short of the offline
//! buffer overflowing (counted in [`AgentStatus::telemetry_dropped`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_wire::payload::{Command, CommandAck, CommandStatus, ReportedState, Telemetry};
use fleet_wire::update::UpdateStatus;
use fleet_wire::{CohortId, DeviceId, Topic};
use futures::FutureExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn, Instrument};

use crate::backoff::{Backoff, BackoffConfig, SessionEnd, Takeover, Takeovers};
use crate::buffer::OfflineBuffer;
use crate::dedup::{RecentCommands, Seen};
use crate::error::{ConfigError, ConnectError, DisconnectCause, Error};
use crate::mqtt::{self, MqttClient, MqttEvent, MqttLoop, PublishRefusal, SubmitError};
use crate::options::ConnectOptions;
use crate::outbox::Outbox;

/// How long to wait for the DISCONNECT to be written once requested.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Command acknowledgements kept while offline.
const ACK_QUEUE: usize = 256;
/// Commands waiting for the handler before new ones are rejected as busy.
const COMMAND_QUEUE: usize = 32;
/// Command ids remembered to recognise redeliveries.
const RECENT_COMMANDS: usize = 256;
const EVENT_CAPACITY: usize = 1024;

/// What a command handler answers; becomes the [`CommandAck`] of the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub status: CommandStatus,
    pub message: Option<String>,
}

impl CommandOutcome {
    pub fn succeeded() -> Self {
        Self {
            status: CommandStatus::Succeeded,
            message: None,
        }
    }

    pub fn accepted() -> Self {
        Self {
            status: CommandStatus::Accepted,
            message: None,
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            status: CommandStatus::Failed,
            message: Some(message.into()),
        }
    }

    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            status: CommandStatus::Rejected,
            message: Some(message.into()),
        }
    }
}

/// Runs the commands sent to this device. Implemented for every
/// `Fn(Command) -> impl Future<Output = CommandOutcome>` closure.
///
/// Commands run one at a time in arrival order; a slow handler delays the next command (up to
/// 32 are queued, then new ones are rejected as busy). A panic becomes a `failed`
/// acknowledgement.
pub trait CommandHandler: Send + Sync + 'static {
    fn handle(&self, command: Command) -> impl Future<Output = CommandOutcome> + Send;
}

impl<F, Fut> CommandHandler for F
where
    F: Fn(Command) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CommandOutcome> + Send,
{
    fn handle(&self, command: Command) -> impl Future<Output = CommandOutcome> + Send {
        self(command)
    }
}

type BoxedOutcome = Pin<Box<dyn Future<Output = CommandOutcome> + Send>>;
type DynHandler = Arc<dyn Fn(Command) -> BoxedOutcome + Send + Sync>;
type TelemetrySource = Box<dyn FnMut(u64) -> Telemetry + Send>;

/// Settings of an [`Agent`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub connect: ConnectOptions,
    /// Also subscribe to `cohorts/{cohort}/updates` (surfaced as [`AgentEvent::CohortUpdate`];
    /// [`crate::update::Updater`] acts on them) and `cohorts/{cohort}/commands` (handled like
    /// the device's own commands). The cohort the platform assigns on
    /// `devices/{id}/assignment` replaces this one.
    pub cohort: Option<CohortId>,
    /// Reported in the retained state on every connect.
    pub firmware_version: Option<String>,
    /// Periodic telemetry; `None` publishes only what [`AgentHandle::publish_telemetry`] gives.
    /// The first message goes out at start. Default 5 s.
    pub telemetry_interval: Option<Duration>,
    /// Stop (cleanly) once this many telemetry messages were acknowledged by the broker; the
    /// periodic telemetry stops after producing this many.
    pub stop_after_telemetry: Option<u64>,
    /// Telemetry messages kept while offline or while [`AgentConfig::max_inflight`] publishes
    /// await their PUBACK; beyond it the oldest are dropped. At least 1; default 1000.
    pub offline_buffer: usize,
    /// Unacknowledged QoS 1 publishes at a time. Default 32, at most 64.
    pub max_inflight: usize,
    pub backoff: BackoffConfig,
    /// On shutdown, how long to keep going to deliver buffered telemetry, pending command
    /// acknowledgements and the reported state before the DISCONNECT. Default 5 s.
    pub drain_timeout: Duration,
}

impl AgentConfig {
    pub fn new(connect: ConnectOptions) -> Self {
        Self {
            connect,
            cohort: None,
            firmware_version: None,
            telemetry_interval: Some(Duration::from_secs(5)),
            stop_after_telemetry: None,
            offline_buffer: 1000,
            max_inflight: 32,
            backoff: BackoffConfig::default(),
            drain_timeout: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<DeviceId, ConfigError> {
        if self.telemetry_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Invalid(
                "telemetry interval must not be zero".into(),
            ));
        }
        if self.offline_buffer == 0 {
            return Err(ConfigError::Invalid(
                "the offline buffer must hold at least one message".into(),
            ));
        }
        if !(1..=64).contains(&self.max_inflight) {
            return Err(ConfigError::Invalid(format!(
                "max in-flight must be between 1 and 64, got {}",
                self.max_inflight
            )));
        }
        if self.backoff.cap < self.backoff.base {
            return Err(ConfigError::Invalid("backoff cap is below its base".into()));
        }
        self.connect.validate()
    }
}

/// What the agent observed; see [`AgentHandle::subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// CONNACK received.
    Connected,
    /// The broker granted the command (and cohort) subscriptions of this session.
    Subscribed,
    /// The broker refused this many of the subscriptions.
    SubscriptionRefused {
        refused: usize,
    },
    /// A connection attempt failed; the agent retries after a backoff.
    ConnectFailed(ConnectError),
    /// An established connection was lost; the agent reconnects after a backoff.
    ConnectionLost(ConnectError),
    /// Follows [`AgentEvent::ConnectionLost`] when another connection with this device's
    /// identity (most likely) took the session over; its `Display` is the line the agent
    /// logs, naming the cause and the wait before it reconnects.
    TakenOver(Takeover),
    CommandReceived(Command),
    /// The broker acknowledged our acknowledgement of a command.
    CommandAckDelivered(CommandAck),
    /// A message on `cohorts/{cohort}/updates`; an empty payload (retained message cleared)
    /// is `Value::Null`.
    CohortUpdate {
        cohort: CohortId,
        payload: Value,
    },
    TelemetryDelivered {
        seq: u64,
    },
    StateDelivered(ReportedState),
    /// The broker acknowledged an update progress report.
    UpdateReportDelivered(UpdateStatus),
    /// The broker refused a publish for good (negative PUBACK: not authorized, bad payload);
    /// the message was dropped. `topic` is where it went, `reason` the broker's answer.
    PublishRefused {
        topic: String,
        reason: String,
    },
    /// The platform moved the device to another cohort (`None`: out of every cohort); the
    /// agent now follows that cohort's topics.
    Reassigned {
        cohort: Option<CohortId>,
    },
    Stopped,
}

/// A snapshot of the agent; see [`AgentHandle::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// A session is up (CONNACK received, not lost since).
    pub connected: bool,
    /// The subscriptions of the current session were granted.
    pub subscribed: bool,
    /// Sessions established so far.
    pub connections: u64,
    /// Telemetry messages the broker acknowledged.
    pub telemetry_delivered: u64,
    /// Telemetry messages waiting in the offline buffer.
    pub telemetry_buffered: usize,
    /// Telemetry messages dropped because the offline buffer was full.
    pub telemetry_dropped: u64,
    pub commands_received: u64,
    /// Command acknowledgements the broker acknowledged.
    pub acks_delivered: u64,
    /// Sessions another connection with this device's identity (most likely) took over: a
    /// second agent running with the same certificate. See [`AgentEvent::TakenOver`].
    pub takeovers: u64,
    /// Publishes the broker refused for good (not authorized, bad payload); each was dropped
    /// and reported as [`AgentEvent::PublishRefused`].
    pub publishes_refused: u64,
    /// The last connection error, cleared by the next CONNACK.
    pub last_error: Option<ConnectError>,
    pub stopped: bool,
}

/// Builds and starts a device agent.
///
/// ```no_run
/// # async fn demo() -> Result<(), device_client::Error> {
/// use device_client::{Agent, AgentConfig, ClientIdentity, CommandOutcome, ConnectOptions, TlsConfig};
/// let tls = TlsConfig::from_ca_file("ca.pem".as_ref())?
///     .with_identity(ClientIdentity::from_files("dev.pem".as_ref(), "dev.key".as_ref())?);
/// let connect = ConnectOptions::new("mqtts://127.0.0.1:8883".parse()?).with_tls(tls);
/// let agent = Agent::new(AgentConfig::new(connect))
///     .on_command(|cmd: fleet_wire::payload::Command| async move {
///         println!("{}", cmd.name);
///         CommandOutcome::succeeded()
///     })
///     .start()?;
/// agent.wait_ready(std::time::Duration::from_secs(10)).await?;
/// agent.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Agent {
    config: AgentConfig,
    handler: DynHandler,
    telemetry: TelemetrySource,
    events: broadcast::Sender<AgentEvent>,
}

impl Agent {
    /// Without [`Agent::on_command`] every command is rejected; without
    /// [`Agent::telemetry_source`] telemetry is `{"seq", "uptime_ms", "ts_ms"}`.
    pub fn new(config: AgentConfig) -> Self {
        let started = Instant::now();
        Self {
            config,
            handler: Arc::new(|_| -> BoxedOutcome {
                Box::pin(async { CommandOutcome::rejected("no command handler") })
            }),
            telemetry: Box::new(move |seq| default_telemetry(seq, started)),
            events: broadcast::channel(EVENT_CAPACITY).0,
        }
    }

    pub fn on_command<H: CommandHandler>(mut self, handler: H) -> Self {
        let handler = Arc::new(handler);
        self.handler = Arc::new(move |command| -> BoxedOutcome {
            let handler = handler.clone();
            Box::pin(async move { handler.handle(command).await })
        });
        self
    }

    /// Produces the periodic telemetry; called with a sequence number starting at 0.
    pub fn telemetry_source(
        mut self,
        source: impl FnMut(u64) -> Telemetry + Send + 'static,
    ) -> Self {
        self.telemetry = Box::new(source);
        self
    }

    /// Events from the very start, before [`Agent::start`] (a later
    /// [`AgentHandle::subscribe`] may miss the first ones).
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Validates the configuration and spawns the agent on the current Tokio runtime. The
    /// connection is made in the background; see [`AgentHandle::wait_ready`].
    pub fn start(self) -> Result<AgentHandle, ConfigError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ConfigError::Invalid("the agent must be started within a Tokio runtime".into())
        })?;
        let device_id = self.config.validate()?;
        let capacity = self.config.max_inflight + 8;
        let (client, event_loop) = mqtt::open(&self.config.connect, &device_id, capacity)?;

        let span = tracing::info_span!("device_agent", device_id = %device_id);
        let (driver_tx, driver_rx) = mpsc::channel(256);
        let (stop_driver, driver_stop_rx) = oneshot::channel();
        let driver = runtime.spawn(
            drive(event_loop, driver_tx, driver_stop_rx, self.config.backoff)
                .instrument(span.clone()),
        );

        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (ack_tx, ack_rx) = mpsc::channel(COMMAND_QUEUE);
        let worker =
            runtime.spawn(run_commands(self.handler, command_rx, ack_tx).instrument(span.clone()));

        let (control_tx, control_rx) = mpsc::channel(64);
        let (status_tx, status_rx) = watch::channel(AgentStatus::default());
        let (cohort_update_tx, cohort_update_rx) = watch::channel(Value::Null);
        let topics = topics_of(&device_id, self.config.cohort.as_ref());
        let state = ReportedState {
            firmware_version: self.config.firmware_version.clone(),
            ..ReportedState::default()
        };
        let task = AgentTask {
            device_id: device_id.clone(),
            topics,
            client,
            driver,
            stop_driver: Some(stop_driver),
            driver_rx,
            control_rx,
            control_open: true,
            command_tx,
            ack_rx,
            worker,
            telemetry: self.telemetry,
            buffer: OfflineBuffer::new(self.config.offline_buffer),
            acks: OfflineBuffer::new(ACK_QUEUE),
            update_reports: OfflineBuffer::new(ACK_QUEUE),
            outbox: Outbox::default(),
            hold_until: None,
            refusal_backoff: Backoff::new(self.config.backoff),
            rng: StdRng::from_entropy(),
            recent: RecentCommands::new(RECENT_COMMANDS),
            state,
            state_dirty: false,
            telemetry_seq: 0,
            commands_running: 0,
            phase: Phase::Running,
            status: AgentStatus::default(),
            status_tx,
            cohort_update_tx,
            events: self.events.clone(),
            config: self.config,
        };
        let task = runtime.spawn(task.run().instrument(span));
        Ok(AgentHandle {
            device_id,
            control: control_tx,
            status: status_rx,
            cohort_update: cohort_update_rx,
            events: self.events,
            task,
        })
    }
}

/// What a device subscribes to: its commands, its assignment, and its cohort's topics.
fn topics_of(device_id: &DeviceId, cohort: Option<&CohortId>) -> Vec<Topic> {
    let mut topics = vec![
        Topic::Commands(device_id.clone()),
        Topic::Assignment(device_id.clone()),
    ];
    if let Some(c) = cohort {
        topics.push(Topic::CohortUpdates(c.clone()));
        topics.push(Topic::CohortCommands(c.clone()));
    }
    topics
}

fn default_telemetry(seq: u64, started: Instant) -> Telemetry {
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut t = Telemetry::new();
    t.insert("seq".into(), seq.into());
    t.insert(
        "uptime_ms".into(),
        (started.elapsed().as_millis() as u64).into(),
    );
    t.insert("ts_ms".into(), ts_ms.into());
    t
}

enum Control {
    Telemetry(Telemetry),
    State(ReportedState),
    FirmwareVersion(String),
    UpdateReport(UpdateStatus),
    Shutdown,
}

/// Reports through a running agent from another task; see [`AgentHandle::sender`].
#[derive(Clone)]
pub struct AgentSender {
    control: mpsc::Sender<Control>,
}

impl AgentSender {
    /// See [`AgentHandle::set_firmware_version`].
    pub async fn set_firmware_version(&self, version: impl Into<String>) -> Result<(), Error> {
        self.control
            .send(Control::FirmwareVersion(version.into()))
            .await
            .map_err(|_| Error::Stopped)
    }

    /// See [`AgentHandle::report_update`].
    pub async fn report_update(&self, status: UpdateStatus) -> Result<(), Error> {
        self.control
            .send(Control::UpdateReport(status))
            .await
            .map_err(|_| Error::Stopped)
    }
}

/// Controls a running agent. Dropping it shuts the agent down cleanly in the background.
pub struct AgentHandle {
    device_id: DeviceId,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<AgentStatus>,
    cohort_update: watch::Receiver<Value>,
    events: broadcast::Sender<AgentEvent>,
    task: JoinHandle<AgentStatus>,
}

impl AgentHandle {
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Follows status changes, e.g. `watch_status().wait_for(|s| s.telemetry_delivered >= 3)`.
    pub fn watch_status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// The newest message on `cohorts/{cohort}/updates` (`Null` before the first), which a
    /// task started after the retained message arrived still sees. Closed when the agent
    /// stops.
    pub fn watch_cohort_update(&self) -> watch::Receiver<Value> {
        self.cohort_update.clone()
    }

    /// Events from now on. A receiver that falls more than 1024 events behind loses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Waits until a session is up and its subscriptions are granted, so commands sent from now
    /// on reach the handler.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        let mut status = self.status.clone();
        let ready = async move {
            status
                .wait_for(|s| (s.connected && s.subscribed) || s.stopped)
                .await
                .map(|s| !s.stopped)
                .unwrap_or(false)
        };
        match tokio::time::timeout(timeout, ready).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Stopped),
            Err(_) => Err(Error::NotReady {
                timeout,
                last_error: self.status.borrow().last_error.clone(),
            }),
        }
    }

    /// Queues a telemetry message (QoS 1). It is buffered while offline; delivery shows in
    /// [`AgentStatus::telemetry_delivered`] and [`AgentEvent::TelemetryDelivered`].
    pub async fn publish_telemetry(&self, telemetry: Telemetry) -> Result<(), Error> {
        self.send(Control::Telemetry(telemetry)).await
    }

    /// Replaces the reported state; it is published (retained, QoS 1) if it changed, and again
    /// on every reconnect.
    pub async fn report_state(&self, state: ReportedState) -> Result<(), Error> {
        self.send(Control::State(state)).await
    }

    /// Changes only the `firmware_version` of the reported state (after an update).
    pub async fn set_firmware_version(&self, version: impl Into<String>) -> Result<(), Error> {
        self.sender().set_firmware_version(version).await
    }

    /// Queues an update progress report on `devices/{id}/updates` (QoS 1). Reports are kept
    /// while offline and sent in order, after the reported state and before command acks.
    pub async fn report_update(&self, status: UpdateStatus) -> Result<(), Error> {
        self.sender().report_update(status).await
    }

    /// A cloneable handle for tasks that report on the agent's behalf (the updater).
    pub fn sender(&self) -> AgentSender {
        AgentSender {
            control: self.control.clone(),
        }
    }

    async fn send(&self, control: Control) -> Result<(), Error> {
        self.control.send(control).await.map_err(|_| Error::Stopped)
    }

    /// Resolves once the agent has stopped: after [`AgentConfig::stop_after_telemetry`] was
    /// reached, or a shutdown.
    pub async fn stopped(&self) {
        let mut status = self.status.clone();
        let _ = status.wait_for(|s| s.stopped).await;
    }

    /// Delivers what is pending (within [`AgentConfig::drain_timeout`]), sends DISCONNECT and
    /// returns the final status.
    pub async fn shutdown(self) -> Result<AgentStatus, Error> {
        let _ = self.control.send(Control::Shutdown).await;
        self.task
            .await
            .map_err(|e| Error::AgentFailed(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Driver

enum DriverEvent {
    Mqtt(MqttEvent),
    /// The connection attempt failed or the session was lost. The driver reconnects only after
    /// `resume` is answered (or dropped).
    Lost {
        error: ConnectError,
        was_connected: bool,
        /// The session was (most likely) taken over; the driver backs off this long.
        takeover: Option<Takeover>,
        resume: oneshot::Sender<()>,
    },
}

async fn drive(
    mut event_loop: MqttLoop,
    tx: mpsc::Sender<DriverEvent>,
    mut stop: oneshot::Receiver<()>,
    backoff: BackoffConfig,
) {
    let mut takeovers = Takeovers::new(&backoff);
    let mut backoff = Backoff::new(backoff);
    let mut rng = StdRng::from_entropy();
    let mut connected_at: Option<Instant> = None;
    // Since when the broker has been unreachable: the first failure after a connection.
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let polled = if connected_at.is_some() {
            // Never cancelled while a session is up: the agent ends it with a DISCONNECT.
            event_loop.poll().await
        } else {
            tokio::select! {
                r = event_loop.poll() => r,
                _ = &mut stop => return,
            }
        };
        match polled {
            Ok(MqttEvent::Other) => {
                if tx.is_closed() {
                    return;
                }
            }
            Ok(event) => {
                let done = event == MqttEvent::DisconnectSent;
                if matches!(event, MqttEvent::Connected { .. }) {
                    connected_at = Some(Instant::now());
                    unreachable_since = None;
                }
                if tx.send(DriverEvent::Mqtt(event)).await.is_err() || done {
                    return;
                }
            }
            Err(error) => {
                let lasted = connected_at.take().map(|since| since.elapsed());
                if let Some(lasted) = lasted {
                    backoff.connection_lost(lasted);
                }
                let takeover = lasted.and_then(|lasted| {
                    let end = match &error {
                        ConnectError::Disconnected(DisconnectCause::SessionTakenOver) => {
                            SessionEnd::TakenOver
                        }
                        ConnectError::Disconnected(DisconnectCause::Unknown) => {
                            SessionEnd::ClosedByBroker
                        }
                        _ => SessionEnd::Other,
                    };
                    takeovers.session_lost(end, lasted, &mut rng)
                });
                let (resume, resumed) = oneshot::channel();
                let lost = DriverEvent::Lost {
                    error,
                    was_connected: lasted.is_some(),
                    takeover,
                    resume,
                };
                if tx.send(lost).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = resumed => {}
                    _ = &mut stop => return,
                }
                event_loop.discard_pending();
                let delay = match takeover {
                    // The broker is there; another agent holds the session. Connecting again
                    // at once would take it back, and that agent would do the same.
                    Some(t) => {
                        info!(
                            takeovers_in_a_row = t.in_a_row,
                            delay_ms = t.wait.as_millis() as u64,
                            "backing off after a takeover: reconnecting in {:.1} s",
                            t.wait.as_secs_f64()
                        );
                        t.wait
                    }
                    None => {
                        let down = unreachable_since.get_or_insert_with(Instant::now).elapsed();
                        let delay = backoff.next_delay_after(&mut rng, down);
                        info!(
                            delay_ms = delay.as_millis() as u64,
                            unreachable_ms = down.as_millis() as u64,
                            "reconnecting in {:.1} s",
                            delay.as_secs_f64()
                        );
                        delay
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut stop => return,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command worker

async fn run_commands(
    handler: DynHandler,
    mut rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<CommandAck>,
) {
    while let Some(command) = rx.recv().await {
        let id = command.id.clone();
        let outcome = match AssertUnwindSafe(handler(command)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(_) => {
                warn!(command_id = %id, "command handler panicked");
                CommandOutcome::failed("command handler panicked")
            }
        };
        let ack = CommandAck {
            id,
            status: outcome.status,
            message: outcome.message,
        };
        if tx.send(ack).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent

/// A publish handed to the MQTT client, kept until its PUBACK.
#[derive(Debug)]
enum Pending {
    Telemetry(QueuedTelemetry),
    State(ReportedState),
    Ack(CommandAck),
    Update(UpdateStatus),
}

#[derive(Debug)]
struct QueuedTelemetry {
    seq: u64,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Delivering what is pending before the DISCONNECT.
    Draining {
        until: Instant,
    },
    /// DISCONNECT requested; waiting for it to be written.
    Disconnecting {
        until: Instant,
    },
    /// Offline: waiting for the driver to stop.
    Stopping {
        until: Instant,
    },
}

struct AgentTask {
    config: AgentConfig,
    device_id: DeviceId,
    topics: Vec<Topic>,
    client: MqttClient,
    driver: JoinHandle<()>,
    stop_driver: Option<oneshot::Sender<()>>,
    driver_rx: mpsc::Receiver<DriverEvent>,
    control_rx: mpsc::Receiver<Control>,
    control_open: bool,
    command_tx: mpsc::Sender<Command>,
    ack_rx: mpsc::Receiver<CommandAck>,
    worker: JoinHandle<()>,
    telemetry: TelemetrySource,
    buffer: OfflineBuffer<QueuedTelemetry>,
    acks: OfflineBuffer<CommandAck>,
    update_reports: OfflineBuffer<UpdateStatus>,
    outbox: Outbox<Pending>,
    /// No publishes are handed to the client before this (after a transient refusal).
    hold_until: Option<Instant>,
    /// Pauses after transient refusals; back to the first on the next positive PUBACK.
    refusal_backoff: Backoff,
    rng: StdRng,
    recent: RecentCommands,
    state: ReportedState,
    state_dirty: bool,
    telemetry_seq: u64,
    commands_running: usize,
    phase: Phase,
    status: AgentStatus,
    status_tx: watch::Sender<AgentStatus>,
    cohort_update_tx: watch::Sender<Value>,
    events: broadcast::Sender<AgentEvent>,
}

impl AgentTask {
    async fn run(mut self) -> AgentStatus {
        info!(topics = ?self.topics.iter().map(Topic::to_string).collect::<Vec<_>>(), "agent started");
        let mut ticker = self.config.telemetry_interval.map(|period| {
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        loop {
            self.pump();
            self.check_drained();
            self.publish_status();
            let deadline = match self.phase {
                Phase::Running => None,
                Phase::Draining { until }
                | Phase::Disconnecting { until }
                | Phase::Stopping { until } => Some(until),
            };
            let ticking = self.ticking() && ticker.is_some();
            tokio::select! {
                event = self.driver_rx.recv() => match event {
                    Some(event) => self.on_driver(event),
                    None => break,
                },
                control = self.control_rx.recv(), if self.control_open => match control {
                    Some(control) => self.on_control(control),
                    None => {
                        self.control_open = false;
                        self.begin_shutdown("handle dropped");
                    }
                },
                Some(ack) = self.ack_rx.recv() => self.on_command_done(ack),
                _ = async { ticker.as_mut().expect("ticking").tick().await }, if ticking => {
                    self.produce_telemetry();
                }
                _ = tokio::time::sleep_until(self.hold_until.unwrap_or_else(Instant::now)), if self.hold_until.is_some() => {
                    // `pump` sends again at the top of the loop.
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if self.on_deadline() {
                        break;
                    }
                }
            }
        }
        self.finish().await
    }

    fn ticking(&self) -> bool {
        self.phase == Phase::Running
            && self
                .config
                .stop_after_telemetry
                .is_none_or(|n| self.telemetry_seq < n)
    }

    // --- inputs ------------------------------------------------------------------------------

    fn on_driver(&mut self, event: DriverEvent) {
        match event {
            DriverEvent::Mqtt(event) => self.on_mqtt(event),
            DriverEvent::Lost {
                error,
                was_connected,
                takeover,
                resume,
            } => {
                if was_connected {
                    warn!(error = %error, "connection lost");
                    if let Some(t) = takeover {
                        warn!(takeovers_in_a_row = t.in_a_row, "{t}");
                        self.status.takeovers += 1;
                        self.emit(AgentEvent::TakenOver(t));
                    }
                    self.status.connected = false;
                    self.status.subscribed = false;
                    self.take_back_unacknowledged();
                    self.emit(AgentEvent::ConnectionLost(error.clone()));
                } else {
                    warn!(error = %error, "connection attempt failed");
                    self.emit(AgentEvent::ConnectFailed(error.clone()));
                }
                self.status.last_error = Some(error);
                if self.phase != Phase::Running {
                    self.stop_offline();
                }
                let _ = resume.send(());
            }
        }
    }

    fn on_mqtt(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected { session_present } => {
                info!(session_present, "connected");
                self.status.connected = true;
                self.status.subscribed = false;
                self.status.connections += 1;
                self.status.last_error = None;
                self.emit(AgentEvent::Connected);
                match self.phase {
                    Phase::Running | Phase::Draining { .. } => {
                        if let Err(e) = self.client.subscribe(&self.topics) {
                            warn!(error = ?e, "could not queue the subscription");
                        }
                        self.state_dirty = true;
                    }
                    // Connected while stopping offline: end the session right away.
                    Phase::Stopping { .. } => self.request_disconnect(),
                    Phase::Disconnecting { .. } => {}
                }
            }
            MqttEvent::SubAck { refused: 0 } => {
                debug!("subscriptions granted");
                self.status.subscribed = true;
                self.emit(AgentEvent::Subscribed);
            }
            MqttEvent::SubAck { refused } => {
                warn!(refused, topics = ?self.topics.iter().map(Topic::to_string).collect::<Vec<_>>(), "broker refused subscriptions");
                self.emit(AgentEvent::SubscriptionRefused { refused });
            }
            MqttEvent::Message { topic, payload } => self.on_message(&topic, &payload),
            MqttEvent::Sent(pkid) => {
                if !self.outbox.sent(pkid) {
                    warn!(pkid, "a publish was sent that the agent did not submit");
                }
            }
            MqttEvent::Deferred(pkid) => {
                if !self.outbox.deferred(pkid) {
                    warn!(pkid, "a publish was deferred that the agent did not submit");
                }
            }
            MqttEvent::Acked(pkid) => self.on_acked(pkid),
            MqttEvent::Refused { pkid, why } => self.on_refused(pkid, why),
            MqttEvent::DisconnectSent => {
                info!("disconnected");
                self.status.connected = false;
                self.status.subscribed = false;
            }
            // The agent publishes QoS 1 only.
            MqttEvent::SentAtMostOnce | MqttEvent::Other => {}
        }
    }

    fn on_acked(&mut self, pkid: u16) {
        self.refusal_backoff.reset();
        match self.outbox.acked(pkid) {
            Some(Pending::Telemetry(t)) => {
                self.status.telemetry_delivered += 1;
                self.emit(AgentEvent::TelemetryDelivered { seq: t.seq });
                if self
                    .config
                    .stop_after_telemetry
                    .is_some_and(|n| self.status.telemetry_delivered >= n)
                {
                    self.begin_shutdown("telemetry count reached");
                }
            }
            Some(Pending::State(s)) => {
                debug!(firmware_version = ?s.firmware_version, "reported state delivered");
                self.emit(AgentEvent::StateDelivered(s));
            }
            Some(Pending::Ack(a)) => {
                debug!(command_id = %a.id, status = ?a.status, "command ack delivered");
                self.status.acks_delivered += 1;
                self.emit(AgentEvent::CommandAckDelivered(a));
            }
            Some(Pending::Update(u)) => {
                debug!(deployment_id = %u.deployment_id, status = u.status.as_str(),
                    "update report delivered");
                self.emit(AgentEvent::UpdateReportDelivered(u));
            }
            None => debug!(pkid, "PUBACK for an unknown packet id"),
        }
    }

    /// A negative PUBACK. A message the broker could not take now goes back to its queue and
    /// is sent again after a pause; one it will never take is dropped and reported.
    fn on_refused(&mut self, pkid: u16, why: PublishRefusal) {
        let Some(message) = self.outbox.acked(pkid) else {
            debug!(pkid, "negative PUBACK for an unknown packet id");
            return;
        };
        if why.transient {
            let pause = self.refusal_backoff.next_delay(&mut self.rng);
            warn!(reason = %why, "the broker could not take a publish now; sending it again in {:.1} s",
                pause.as_secs_f64());
            self.put_back(vec![message]);
            self.hold_until = Some(Instant::now() + pause);
            return;
        }
        let topic = match &message {
            Pending::Telemetry(_) => Topic::Telemetry(self.device_id.clone()),
            Pending::State(_) => Topic::State(self.device_id.clone()),
            Pending::Ack(_) => Topic::CommandAck(self.device_id.clone()),
            Pending::Update(_) => Topic::UpdateStatus(self.device_id.clone()),
        }
        .to_string();
        warn!(topic, reason = %why, "the broker refused a publish; dropped");
        self.status.publishes_refused += 1;
        self.emit(AgentEvent::PublishRefused {
            topic,
            reason: why.to_string(),
        });
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        match Topic::parse(topic) {
            Ok(Topic::Commands(id)) if id == self.device_id => self.on_command(payload),
            Ok(Topic::Assignment(id)) if id == self.device_id => self.on_assignment(payload),
            Ok(Topic::CohortCommands(cohort)) if self.config.cohort.as_ref() == Some(&cohort) => {
                self.on_command(payload)
            }
            Ok(Topic::CohortUpdates(cohort)) if self.config.cohort.as_ref() == Some(&cohort) => {
                let payload = if payload.is_empty() {
                    Ok(Value::Null)
                } else {
                    serde_json::from_slice::<Value>(payload)
                };
                match payload {
                    Ok(payload) => {
                        info!(cohort = %cohort, "cohort update");
                        self.cohort_update_tx.send_replace(payload.clone());
                        self.emit(AgentEvent::CohortUpdate { cohort, payload });
                    }
                    Err(e) => warn!(cohort = %cohort, error = %e, "cohort update is not JSON"),
                }
            }
            _ => debug!(topic, "ignoring a message on an unexpected topic"),
        }
    }

    /// Follows the cohort the platform assigned. The broker ends the session of a moved
    /// device, and the next one subscribes to the new cohort's topics; when the assignment
    /// arrives on a session that already has the new rights, it subscribes at once.
    fn on_assignment(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let assignment: fleet_wire::payload::DeviceAssignment =
            match serde_json::from_slice(payload) {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "assignment is not a DeviceAssignment; ignored");
                    return;
                }
            };
        if assignment.cohort_id == self.config.cohort {
            return;
        }
        info!(from = ?self.config.cohort, to = ?assignment.cohort_id, "moved to another cohort");
        self.config.cohort = assignment.cohort_id.clone();
        self.topics = topics_of(&self.device_id, self.config.cohort.as_ref());
        if self.status.connected {
            let cohort_topics: Vec<Topic> = self.topics[2..].to_vec();
            if !cohort_topics.is_empty() {
                if let Err(e) = self.client.subscribe(&cohort_topics) {
                    warn!(error = ?e, "could not queue the new cohort's subscriptions");
                }
            }
        }
        self.emit(AgentEvent::Reassigned {
            cohort: assignment.cohort_id,
        });
    }

    fn on_command(&mut self, payload: &[u8]) {
        let command: Command = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                let id = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str().map(str::to_owned));
                warn!(command_id = ?id, error = %e, "malformed command");
                if let Some(id) = id {
                    self.queue_ack(CommandAck {
                        id,
                        status: CommandStatus::Rejected,
                        message: Some(format!("malformed command: {e}")),
                    });
                }
                return;
            }
        };
        match self.recent.seen(&command.id) {
            Seen::New => {}
            Seen::InProgress => {
                debug!(command_id = %command.id, "redelivered command is still running");
                return;
            }
            Seen::Done(ack) => {
                debug!(command_id = %command.id, "redelivered command; repeating its ack");
                let ack = ack.clone();
                self.acks.push(ack);
                return;
            }
        }
        info!(command_id = %command.id, name = %command.name, "command received");
        self.status.commands_received += 1;
        self.emit(AgentEvent::CommandReceived(command.clone()));
        let id = command.id.clone();
        if self.phase != Phase::Running {
            self.queue_ack(rejection(&id, "the device is shutting down"));
            return;
        }
        match self.command_tx.try_send(command) {
            Ok(()) => {
                self.recent.begin(&id);
                self.commands_running += 1;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queue_ack(rejection(
                    &id,
                    "the device is busy; too many commands queued",
                ));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.queue_ack(CommandAck {
                id,
                status: CommandStatus::Failed,
                message: Some("the command handler has stopped".into()),
            }),
        }
    }

    fn on_command_done(&mut self, ack: CommandAck) {
        self.commands_running = self.commands_running.saturating_sub(1);
        info!(command_id = %ack.id, status = ?ack.status, "command done");
        self.queue_ack(ack);
    }

    fn queue_ack(&mut self, ack: CommandAck) {
        self.recent.finish(&ack);
        self.acks.push(ack);
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Telemetry(t) => self.enqueue_telemetry(t),
            Control::State(s) => {
                if s != self.state {
                    self.state = s;
                    self.state_dirty = true;
                }
            }
            Control::FirmwareVersion(v) => {
                if self.state.firmware_version.as_deref() != Some(v.as_str()) {
                    self.state.firmware_version = Some(v);
                    self.state_dirty = true;
                }
            }
            Control::UpdateReport(u) => self.update_reports.push(u),
            Control::Shutdown => self.begin_shutdown("shutdown requested"),
        }
    }

    fn produce_telemetry(&mut self) {
        let t = (self.telemetry)(self.telemetry_seq);
        self.enqueue_telemetry(t);
    }

    fn enqueue_telemetry(&mut self, t: Telemetry) {
        let seq = self.telemetry_seq;
        self.telemetry_seq += 1;
        match serde_json::to_vec(&t) {
            Ok(payload) => self.buffer.push(QueuedTelemetry { seq, payload }),
            Err(e) => warn!(error = %e, "telemetry is not serializable"),
        }
    }

    // --- outputs -----------------------------------------------------------------------------

    /// Hands queued messages to the client while the session is up and the window has room:
    /// reported state first, then update reports, then command acks, then telemetry.
    fn pump(&mut self) {
        if self.hold_until.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.hold_until = None;
        if !self.status.connected
            || matches!(
                self.phase,
                Phase::Disconnecting { .. } | Phase::Stopping { .. }
            )
        {
            return;
        }
        while self.outbox.len() < self.config.max_inflight {
            let (topic, message) = if self.state_dirty {
                self.state_dirty = false;
                (
                    Topic::State(self.device_id.clone()),
                    Pending::State(self.state.clone()),
                )
            } else if let Some(u) = self.update_reports.pop() {
                (
                    Topic::UpdateStatus(self.device_id.clone()),
                    Pending::Update(u),
                )
            } else if let Some(ack) = self.acks.pop() {
                (Topic::CommandAck(self.device_id.clone()), Pending::Ack(ack))
            } else if let Some(t) = self.buffer.pop() {
                (
                    Topic::Telemetry(self.device_id.clone()),
                    Pending::Telemetry(t),
                )
            } else {
                break;
            };
            let (payload, retain) = match &message {
                Pending::State(s) => (serde_json::to_vec(s), true),
                Pending::Ack(a) => (serde_json::to_vec(a), false),
                Pending::Update(u) => (serde_json::to_vec(u), false),
                Pending::Telemetry(t) => (Ok(t.payload.clone()), false),
            };
            let payload = payload.expect("wire payload types serialize");
            match self.client.publish(&topic, payload, retain) {
                Ok(()) => self.outbox.submitted(message),
                Err(e) => {
                    if e == SubmitError::Closed {
                        debug!("client closed; keeping the message");
                    }
                    self.put_back(vec![message]);
                    break;
                }
            }
        }
    }

    /// Returns messages of a lost session to their queues, oldest first.
    fn take_back_unacknowledged(&mut self) {
        let lost = self.outbox.lost();
        self.put_back(lost);
    }

    fn put_back(&mut self, messages: Vec<Pending>) {
        let mut telemetry = Vec::new();
        let mut acks = Vec::new();
        let mut updates = Vec::new();
        for m in messages {
            match m {
                Pending::Telemetry(t) => telemetry.push(t),
                Pending::Ack(a) => acks.push(a),
                Pending::Update(u) => updates.push(u),
                // The current state is published again on the next connect.
                Pending::State(_) => self.state_dirty = true,
            }
        }
        self.buffer.requeue(telemetry);
        self.acks.requeue(acks);
        self.update_reports.requeue(updates);
    }

    fn emit(&self, event: AgentEvent) {
        let _ = self.events.send(event);
    }

    fn publish_status(&mut self) {
        self.status.telemetry_buffered = self.buffer.len();
        self.status.telemetry_dropped = self.buffer.dropped();
        let status = &self.status;
        self.status_tx.send_if_modified(|s| {
            if s == status {
                false
            } else {
                *s = status.clone();
                true
            }
        });
    }

    // --- shutdown ----------------------------------------------------------------------------

    fn begin_shutdown(&mut self, why: &str) {
        if self.phase != Phase::Running {
            return;
        }
        info!(reason = why, "shutting down");
        if self.status.connected {
            self.phase = Phase::Draining {
                until: Instant::now() + self.config.drain_timeout,
            };
            self.check_drained();
        } else {
            self.stop_offline();
        }
    }

    fn drained(&self) -> bool {
        self.outbox.is_empty()
            && self.buffer.is_empty()
            && self.acks.is_empty()
            && self.update_reports.is_empty()
            && !self.state_dirty
            && self.commands_running == 0
    }

    fn check_drained(&mut self) {
        if matches!(self.phase, Phase::Draining { .. }) && self.drained() {
            self.request_disconnect();
        }
    }

    fn request_disconnect(&mut self) {
        match self.client.disconnect() {
            Ok(()) => {
                self.phase = Phase::Disconnecting {
                    until: Instant::now() + DISCONNECT_TIMEOUT,
                };
            }
            Err(e) => {
                debug!(error = ?e, "could not queue DISCONNECT");
                self.phase = Phase::Stopping {
                    until: Instant::now(),
                };
            }
        }
    }

    /// Ends without a session: tells the driver not to reconnect.
    fn stop_offline(&mut self) {
        if let Some(stop) = self.stop_driver.take() {
            let _ = stop.send(());
        }
        self.phase = Phase::Stopping {
            until: Instant::now() + mqtt::connect_budget(&self.config.connect),
        };
    }

    /// Returns true when the agent should stop now.
    fn on_deadline(&mut self) -> bool {
        match self.phase {
            Phase::Draining { .. } => {
                warn!(
                    buffered = self.buffer.len(),
                    unacknowledged = self.outbox.len(),
                    "drain timeout; disconnecting with messages undelivered"
                );
                self.request_disconnect();
                false
            }
            Phase::Disconnecting { .. } | Phase::Stopping { .. } => {
                debug!("the connection did not end in time; dropping it");
                true
            }
            Phase::Running => false,
        }
    }

    async fn finish(mut self) -> AgentStatus {
        self.driver.abort();
        self.worker.abort();
        self.status.connected = false;
        self.status.subscribed = false;
        self.status.stopped = true;
        self.publish_status();
        self.emit(AgentEvent::Stopped);
        info!(
            delivered = self.status.telemetry_delivered,
            buffered = self.status.telemetry_buffered,
            dropped = self.status.telemetry_dropped,
            "agent stopped"
        );
        self.status
    }
}

fn rejection(id: &str, message: &str) -> CommandAck {
    CommandAck {
        id: id.to_owned(),
        status: CommandStatus::Rejected,
        message: Some(message.to_owned()),
    }
}
