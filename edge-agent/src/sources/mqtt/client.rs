//! One broker connection: the rumqttc event loop, the mapping of messages to readings, and the
//! acknowledgements that follow the buffer's commits.
//!
//! Four tasks per broker, so no one of them can stall another's work:
//! - the *event loop* task polls rumqttc (keep-alive pings, reconnects with capped exponential
//!   backoff and jitter, resubscribing after every connect, reading the TLS files again before
//!   each reconnect) and hands each incoming PUBLISH on;
//! - the *mapper* turns a message into readings (through [`Router`], as `probe` does), sends them
//!   to the buffer writer together with a oneshot that fires when they are committed, sends a bad
//!   payload's dead letter to the dead-letter writer the same way, and queues the message with
//!   both oneshots for acknowledgement; for Sparkplug data whose birth is missing it also queues
//!   a rebirth request to the edge node ([`super::sparkplug::rebirth`]);
//! - the [*dead-letter writer*](super::dead_letters) commits dead letters to the buffer file's
//!   dead-letter table on its own connection;
//! - the *acker* takes the queue in arrival order, waits for each message's commits and only then
//!   sends its PUBACK. In-order acks are what MQTT 3.1.1 (4.6) and MQTT 5 (4.6) ask of a
//!   client; since the writers commit in the order they received, waiting in order costs little.
//!
//! The tasks are the same for MQTT 3.1.1 and MQTT 5: [`super::connection`] hides which
//! protocol's event loop and client they drive.
//!
//! A message whose payload gives no reading (or not all of them) is counted per subscription and
//! reason, logged, dead-lettered, and acknowledged at its turn once its dead letter (and its
//! good readings, if any) are committed: it will never get better, and an unacknowledged message
//! would come back on every reconnect.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::connection::{self, Connection, Happened, Message, Requests};
use super::dead_letters::{DeadLetterWriter, Recording};
use super::payload::shown;
use super::route::{Route, Router};
use super::sparkplug::rebirth::{self, Limiter};
use super::topic;
use crate::config::MqttBroker;
use crate::sources::Delivery;

/// First wait after a failed connection; doubles per failure up to [`BACKOFF_CAP`].
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest wait between connection attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Messages between the event loop and the mapper. The broker sends at most its in-flight
/// window (Mosquitto: 20) of unacknowledged QoS 1 messages, so this only fills with QoS 0.
const INCOMING_CAPACITY: usize = 256;
/// Messages waiting for their commit before the mapper waits too.
const ACK_QUEUE_CAPACITY: usize = 1024;
/// Dead letters waiting for their commit before the mapper waits too.
const DEAD_LETTER_CAPACITY: usize = 256;
/// How long a stopping source waits for the commits of what it already handed over.
const ACK_DEADLINE: Duration = Duration::from_secs(3);
/// How long a stopping source lets the event loop send the last acks and the DISCONNECT.
const DISCONNECT_DEADLINE: Duration = Duration::from_secs(1);

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("broker `{broker}`: environment variable `{var}` (password_env) is not set")]
    PasswordEnv { broker: String, var: String },
    #[error("broker `{broker}`: cannot read password_file {}: {source}", path.display())]
    PasswordFile {
        broker: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("broker `{broker}`: {source}")]
    Tls {
        broker: String,
        source: Box<super::tls::TlsError>,
    },
    #[error("broker `{broker}`: subscription {index} ({filter}): {source}")]
    Mapping {
        broker: String,
        index: usize,
        filter: String,
        source: Box<topic::TopicError>,
    },
}

/// A message waiting for its acknowledgement, in arrival order.
struct PendingAck {
    message: Message,
    /// Fire when the message's readings and its dead letter are committed; empty when it had
    /// neither (a retained message, a topic of no subscription).
    committed: Vec<oneshot::Receiver<()>>,
}

/// What the mapper needs besides its channels.
struct Mapper {
    broker: String,
    router: Router,
    /// Bad payloads per subscription (same index as the router's), for the log line.
    bad_payloads: Vec<u64>,
    /// Where Sparkplug rebirth requests are published.
    requests: Requests,
    rebirths: Limiter,
}

/// Runs one broker's source until `shutdown` is cancelled. `buffer` is the buffer file, where
/// bad payloads go to the dead-letter table.
pub async fn run_broker(
    broker: MqttBroker,
    buffer: PathBuf,
    deliveries: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
) {
    let span = info_span!("mqtt", component = "mqtt", broker = %broker.name);
    async move {
        let router = match Router::new(&broker) {
            Ok(router) => router,
            Err(e) => {
                // Validation rejects what could fail here; a config built in code may not.
                error!("{e}; the source does not start");
                return;
            }
        };
        crate::metrics::global().mqtt_broker_started(&broker.name);
        info!(
            protocol = %broker.protocol,
            tls = broker.tls.is_some(),
            host = %broker.host,
            port = broker.port(),
            "mqtt source starting"
        );
        let Some((requests, connection)) = connect_with_retry(&broker, &shutdown).await else {
            return;
        };
        let dead_letter_writer =
            DeadLetterWriter::open(buffer, broker.name.clone(), broker.max_dead_letters).await;
        let (dead_letter_tx, dead_letter_rx) = mpsc::channel(DEAD_LETTER_CAPACITY);
        let dead_letter_stop = CancellationToken::new();
        let dead_letter_task = tokio::spawn(
            dead_letter_writer
                .run(dead_letter_rx, dead_letter_stop.clone())
                .in_current_span(),
        );
        let filters: Vec<(String, u8)> = broker
            .subscriptions
            .iter()
            .map(|s| (s.topic.clone(), s.qos))
            .collect();
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_CAPACITY);
        let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE_CAPACITY);
        let loop_stop = CancellationToken::new();
        let poller = tokio::spawn(
            poll_events(
                connection,
                requests.clone(),
                filters,
                incoming_tx,
                loop_stop.clone(),
            )
            .in_current_span(),
        );
        let acker = tokio::spawn(ack_in_order(requests.clone(), ack_rx).in_current_span());
        let mapper = Mapper {
            broker: broker.name.clone(),
            bad_payloads: vec![0; router.routes().len()],
            router,
            requests: requests.clone(),
            rebirths: Limiter::default(),
        };
        let outputs = Outputs {
            deliveries: &deliveries,
            dead_letters: dead_letter_tx,
            acks: ack_tx,
        };
        mapper.run(incoming_rx, outputs, &shutdown).await;
        // The mapper dropped the ack queue's sender: the acker finishes what is queued, waiting
        // for the dead letters' commits too; then the dead-letter writer may stop retrying.
        if let Err(e) = acker.await {
            error!("the acknowledgement task failed: {e}");
        }
        dead_letter_stop.cancel();
        if let Err(e) = dead_letter_task.await {
            error!("the dead-letter task failed: {e}");
        }
        if !requests.try_disconnect() {
            debug!("the event loop is gone; nothing to disconnect");
        }
        if tokio::time::timeout(DISCONNECT_DEADLINE, poller)
            .await
            .is_err()
        {
            loop_stop.cancel();
        }
        info!("mqtt source stopped");
    }
    .instrument(span)
    .await;
}

/// The connection; a password or TLS file that cannot be read yet (a secret mounted late) is
/// retried with backoff rather than ending the source.
async fn connect_with_retry(
    broker: &MqttBroker,
    shutdown: &CancellationToken,
) -> Option<(Requests, Connection)> {
    let mut backoff = BACKOFF_START;
    loop {
        match connection::connect(broker) {
            Ok(connected) => return Some(connected),
            Err(e) => {
                error!(retry_in_ms = crate::millis(backoff), "{e}");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// Polls the event loop until `stop`, or until the DISCONNECT went out.
async fn poll_events(
    mut connection: Connection,
    requests: Requests,
    filters: Vec<(String, u8)>,
    incoming: mpsc::Sender<Message>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    let mut connected = false;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = connection.next() => event,
        };
        match event {
            Ok(Happened::Connected {
                session_present,
                session_expiry_s,
            }) => {
                info!(session_present, "connected to the broker");
                if let Some(granted) = session_expiry_s {
                    // MQTT 5 brokers send the interval only when they override the agent's.
                    warn!(
                        session_expiry_s = granted,
                        "the broker keeps the session for another time than session_expiry asks; messages published while the agent is away longer than this are lost"
                    );
                }
                connected = true;
                backoff = BACKOFF_START;
                // Subscribing again on a resumed session is harmless and covers a broker
                // that lost its sessions (a restart without persistence).
                if let Err(e) = requests.subscribe(&filters) {
                    error!("cannot queue the subscriptions: {e}");
                }
            }
            Ok(Happened::Subscribed { codes, refused }) => {
                // A refused filter (an ACL, a broker limit) shows in the codes.
                if refused.is_some() {
                    warn!(codes = %codes, "subscribed, but the broker refused a filter");
                } else {
                    info!(codes = %codes, "subscribed");
                }
            }
            Ok(Happened::Message(message)) => {
                // After the mapper stopped, a message is left unacknowledged: the broker sends
                // it again on the next connect.
                let _ = incoming.send(message).await;
            }
            Ok(Happened::ServerDisconnect(reason)) => {
                warn!("the broker closes the connection: {reason}");
            }
            Ok(Happened::Closed) => return,
            Ok(Happened::Other) => {}
            Err(failure) => {
                let wait = jittered(backoff);
                if connected {
                    warn!(
                        retry_in_ms = crate::millis(wait),
                        "connection to the broker lost: {failure}"
                    );
                } else {
                    warn!(
                        retry_in_ms = crate::millis(wait),
                        "cannot connect to the broker: {failure}"
                    );
                }
                connected = false;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                connection.renew_tls();
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// 75 % to 100 % of `backoff`, so gateways that lost the same broker do not return in step.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::random_range(0.75..=1.0))
}

/// Where the mapper sends what it made of a message.
struct Outputs<'a> {
    deliveries: &'a mpsc::Sender<Delivery>,
    dead_letters: mpsc::Sender<Recording>,
    acks: mpsc::Sender<PendingAck>,
}

impl Mapper {
    /// Maps messages until `shutdown`, handing readings to the buffer writer, bad payloads to
    /// the dead-letter writer and every message to the acker.
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Message>,
        out: Outputs<'_>,
        shutdown: &CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                got = incoming.recv() => match got {
                    Some(message) => message,
                    None => return,
                },
            };
            let arrival_us = now_us();
            debug!(
                topic = %message.topic,
                pkid = message.pkid,
                dup = message.dup,
                bytes = message.payload.len(),
                "message received"
            );
            let mut committed = Vec::new();
            let (readings, dead_letter) = if message.retain {
                // The broker replays a topic's retained last value on every subscribe, so on
                // every reconnect: it is not a new measurement and would be recorded again each
                // time.
                debug!(topic = %message.topic, "retained message skipped");
                (Vec::new(), None)
            } else if let Some((index, route)) = self.router.route(&message.topic) {
                let mapped = route.map(&message.topic, &message.payload, arrival_us);
                if let Some(command) = route.rebirth_command(&message.topic, &mapped.problems) {
                    request_rebirth(&self.requests, &mut self.rebirths, &command);
                }
                let dead_letter = (!mapped.problems.is_empty()).then(|| {
                    self.bad_payloads[index] += 1;
                    count_and_log(
                        &self.broker,
                        route,
                        self.bad_payloads[index],
                        &message,
                        &mapped.problems,
                    );
                    route.dead_letter(
                        &self.broker,
                        &message.topic,
                        &message.payload,
                        arrival_us,
                        &mapped.problems,
                    )
                });
                (mapped.readings, dead_letter)
            } else {
                // A subscription of an earlier configuration that the persistent session still
                // holds: nothing maps it, and keeping it would bring it back forever.
                warn!(
                    topic = %message.topic,
                    "message matches no subscription of this configuration; acknowledged and dropped"
                );
                (Vec::new(), None)
            };
            if let Some(letter) = dead_letter {
                let (tx, rx) = oneshot::channel();
                let recording = Recording {
                    letter,
                    committed: tx,
                };
                if out.dead_letters.send(recording).await.is_err() {
                    // The dead-letter writer is gone: leave the message unacknowledged.
                    return;
                }
                committed.push(rx);
            }
            if !readings.is_empty() {
                let (tx, rx) = oneshot::channel();
                let delivery = Delivery {
                    readings,
                    committed: tx,
                };
                if out.deliveries.send(delivery).await.is_err() {
                    // The writer is gone (the agent is stopping): leave the message
                    // unacknowledged so the broker keeps it.
                    return;
                }
                committed.push(rx);
            }
            if out
                .acks
                .send(PendingAck { message, committed })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Asks an edge node for its births, unless it was asked within the interval. The message that
/// lacked them is dead-lettered as usual; the node's answer makes the next ones decodable.
fn request_rebirth(requests: &Requests, rebirths: &mut Limiter, command: &str) {
    if !rebirths.admit(command, std::time::Instant::now()) {
        return;
    }
    let now_ms = u64::try_from(now_us() / 1000).unwrap_or(0);
    match requests.try_publish(command, rebirth::request_payload(now_ms)) {
        Ok(()) => info!(
            topic = command,
            "Sparkplug rebirth requested: data came from an edge node whose birth the agent has not seen"
        ),
        Err(e) => {
            // The request queue is full or the connection is stopping: ask with the next
            // message instead.
            rebirths.forget(command);
            warn!(
                topic = command,
                "cannot queue the Sparkplug rebirth request: {e}"
            );
        }
    }
}

/// Counts a bad payload by (broker, subscription, reason of its first problem) and logs each of
/// its problems with the subscription's count so far and the first bytes of the payload.
fn count_and_log(
    broker: &str,
    route: &Route,
    count: u64,
    message: &Message,
    problems: &[super::payload::PayloadError],
) {
    let reason = problems
        .first()
        .map_or("unknown", super::payload::PayloadError::reason);
    crate::metrics::global().mqtt_bad_payload(broker, &route.filter, reason);
    for problem in problems {
        warn!(
            subscription = %route.filter,
            reason = %problem.reason(),
            bad_payloads = count,
            payload = %shown(&message.payload),
            "bad payload: {problem}"
        );
    }
}

/// Acknowledges messages in arrival order, each after its readings were committed.
async fn ack_in_order(requests: Requests, mut queue: mpsc::Receiver<PendingAck>) {
    let mut waiting: VecDeque<PendingAck> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(pending) => waiting.push_back(pending),
                None => return,
            }
        }
        while let Ok(pending) = queue.try_recv() {
            waiting.push_back(pending);
        }
        let stopping = queue.is_closed();
        let front = waiting
            .front_mut()
            .expect("a message was queued above or is still waiting");
        while let Some(committed) = front.committed.pop() {
            let outcome = if stopping {
                // Stopping: the writer commits within its interval; past the deadline the
                // broker keeps the message and sends it again next time.
                tokio::time::timeout(ACK_DEADLINE, committed)
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                committed.await.ok()
            };
            if outcome.is_none() {
                debug!(
                    waiting = waiting.len(),
                    "readings or dead letters were not committed; the broker will send these messages again"
                );
                return;
            }
        }
        let pending = waiting
            .pop_front()
            .expect("the front message was looked at above");
        if let Err(e) = requests.ack(&pending.message).await {
            debug!("cannot acknowledge (the connection is stopping): {e}");
            return;
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use rumqttc::Request;

    use super::*;

    fn publish(pkid: u16) -> Message {
        Message::test_v4("plant/m-1/kwh", pkid, b"1")
    }

    fn acked(requests: &flume::Receiver<Request>) -> Vec<u16> {
        requests
            .try_iter()
            .map(|request| match request {
                Request::PubAck(ack) => ack.pkid,
                other => panic!("only acknowledgements expected, got {other:?}"),
            })
            .collect()
    }

    /// Lets the acker run until it waits again.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_is_acknowledged_only_after_its_commit_and_in_arrival_order() {
        let (requests_tx, requests) = flume::bounded(16);
        let (queue, queue_rx) = mpsc::channel(16);
        let acker = tokio::spawn(ack_in_order(Requests::test_v4(requests_tx), queue_rx));
        let (first_done, first) = oneshot::channel();
        let (second_done, second) = oneshot::channel();
        for (pkid, committed) in [(1, vec![first]), (2, vec![second]), (3, vec![])] {
            let pending = PendingAck {
                message: publish(pkid),
                committed,
            };
            assert!(queue.send(pending).await.is_ok());
        }
        settle().await;
        assert_eq!(
            acked(&requests),
            Vec::<u16>::new(),
            "nothing is committed yet"
        );

        second_done.send(()).unwrap();
        settle().await;
        assert_eq!(
            acked(&requests),
            Vec::<u16>::new(),
            "message 2 is committed, but message 1 before it is not"
        );

        first_done.send(()).unwrap();
        settle().await;
        // Message 3 had no readings (a bad payload): it follows at once.
        assert_eq!(acked(&requests), vec![1, 2, 3]);
        drop(queue);
        acker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_with_readings_and_a_dead_letter_waits_for_both_commits() {
        let (requests_tx, requests) = flume::bounded(16);
        let (queue, queue_rx) = mpsc::channel(16);
        let acker = tokio::spawn(ack_in_order(Requests::test_v4(requests_tx), queue_rx));
        let (readings_done, readings) = oneshot::channel();
        let (letter_done, letter) = oneshot::channel();
        let pending = PendingAck {
            message: publish(1),
            committed: vec![letter, readings],
        };
        assert!(queue.send(pending).await.is_ok());
        readings_done.send(()).unwrap();
        settle().await;
        assert_eq!(
            acked(&requests),
            Vec::<u16>::new(),
            "the readings are committed, the dead letter is not"
        );
        letter_done.send(()).unwrap();
        settle().await;
        assert_eq!(acked(&requests), vec![1]);
        drop(queue);
        acker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_whose_readings_were_not_committed_is_never_acknowledged() {
        let (requests_tx, requests) = flume::bounded(16);
        let (queue, queue_rx) = mpsc::channel(16);
        let acker = tokio::spawn(ack_in_order(Requests::test_v4(requests_tx), queue_rx));
        let (done, committed) = oneshot::channel();
        let (writer_gone, lost) = oneshot::channel::<()>();
        for (pkid, committed) in [(1, vec![committed]), (2, vec![lost]), (3, vec![])] {
            let pending = PendingAck {
                message: publish(pkid),
                committed,
            };
            assert!(queue.send(pending).await.is_ok());
        }
        done.send(()).unwrap();
        // The writer stops before committing message 2: the broker must send 2 and 3 again.
        drop(writer_gone);
        acker.await.unwrap();
        assert_eq!(acked(&requests), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_source_waits_for_commits_only_until_the_deadline() {
        let (requests_tx, requests) = flume::bounded(16);
        let (queue, queue_rx) = mpsc::channel(16);
        let (_never, committed) = oneshot::channel::<()>();
        let pending = PendingAck {
            message: publish(1),
            committed: vec![committed],
        };
        assert!(queue.send(pending).await.is_ok());
        drop(queue);
        let started = tokio::time::Instant::now();
        ack_in_order(Requests::test_v4(requests_tx), queue_rx).await;
        assert_eq!(started.elapsed(), ACK_DEADLINE);
        assert_eq!(acked(&requests), Vec::<u16>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn mqtt_5_messages_are_acknowledged_the_same_way() {
        use rumqttc::v5::Request as Request5;
        let (requests_tx, requests) = flume::bounded(16);
        let (queue, queue_rx) = mpsc::channel(16);
        let acker = tokio::spawn(ack_in_order(Requests::test_v5(requests_tx), queue_rx));
        let (first_done, first) = oneshot::channel();
        for (pkid, committed) in [(7, vec![first]), (8, vec![])] {
            let pending = PendingAck {
                message: Message::test_v5("plant/m-1/kwh", pkid, b"1"),
                committed,
            };
            assert!(queue.send(pending).await.is_ok());
        }
        settle().await;
        assert!(requests.is_empty(), "message 7 is not committed yet");
        first_done.send(()).unwrap();
        settle().await;
        let pkids: Vec<u16> = requests
            .try_iter()
            .map(|request| match request {
                Request5::PubAck(ack) => ack.pkid,
                other => panic!("only acknowledgements expected, got {other:?}"),
            })
            .collect();
        assert_eq!(pkids, vec![7, 8]);
        drop(queue);
        acker.await.unwrap();
    }
}
