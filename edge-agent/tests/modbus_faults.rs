//! The Modbus poller against an in-process fault server (tokio-modbus's `tcp-server`) for what
//! pymodbus cannot script: it counts and records every request, refuses addresses it does not
//! have with exception 2 and reads longer than its limit with exception 3, answers slowly, drops
//! its connections on demand, and a raw TCP server answers with junk. In every fault test a
//! second device on its own server keeps delivering good readings at its poll rate. What the
//! poller learns is kept in a real buffer file across restarts.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::Poller;
use edge_agent::Reading;
use edge_agent::config::{ConfigDuration, DataType, ModbusDevice, ModbusTag, RegisterKind};
use edge_agent::contract::Quality;
use edge_agent::sources::modbus::{run_device, run_device_with_memory};
use pipeline_e2e::now_us;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

/// What the fault server holds and what it was asked.
#[derive(Default)]
struct PlcState {
    /// Holding registers it has; every other address answers exception 2.
    holding: Mutex<BTreeMap<u16, u16>>,
    /// Every holding-register read, as (start, count), in arrival order.
    requests: Mutex<Vec<(u16, u16)>>,
    /// How long each answer is held back.
    delay: Mutex<Duration>,
    /// A read covering this address is answered with this exception.
    refuse: Mutex<Option<(u16, ExceptionCode)>>,
    /// A read of more registers than this is answered with exception 3 (illegal data value),
    /// as devices with a limit below the protocol's 125 registers do.
    max_count: Mutex<Option<u16>>,
    /// Connections accepted.
    connections: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct FaultService(Arc<PlcState>);

impl tokio_modbus::server::Service for FaultService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, request: Request<'static>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            let Request::ReadHoldingRegisters(start, count) = request else {
                return Err(ExceptionCode::IllegalFunction);
            };
            lock(&state.requests).push((start, count));
            let delay = *lock(&state.delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if lock(&state.max_count).is_some_and(|max| count > max) {
                return Err(ExceptionCode::IllegalDataValue);
            }
            let range = u32::from(start)..u32::from(start) + u32::from(count);
            if let Some((address, code)) = *lock(&state.refuse)
                && range.contains(&u32::from(address))
            {
                return Err(code);
            }
            let holding = lock(&state.holding);
            range
                .map(|address| {
                    u16::try_from(address)
                        .ok()
                        .and_then(|address| holding.get(&address).copied())
                        .ok_or(ExceptionCode::IllegalDataAddress)
                })
                .collect::<Result<Vec<u16>, _>>()
                .map(Response::ReadHoldingRegisters)
        })
    }
}

/// A scripted Modbus TCP server on 127.0.0.1.
struct FaultPlc {
    addr: SocketAddr,
    state: Arc<PlcState>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FaultPlc {
    async fn start(holding: &[(u16, u16)]) -> Self {
        let state = PlcState::default();
        lock(&state.holding).extend(holding.iter().copied());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        Self::serve(listener, Arc::new(state))
    }

    fn serve(listener: TcpListener, state: Arc<PlcState>) -> Self {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let state = Arc::clone(&state);
            let stop = stop.clone();
            async move {
                let server = Server::new(listener);
                let on_connected = |stream, peer| {
                    let state = Arc::clone(&state);
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    async move {
                        accept_tcp_connection(stream, peer, |_| {
                            Ok(Some(FaultService(Arc::clone(&state))))
                        })
                    }
                };
                // Dropping `serve` (on stop) also ends every connection it accepted.
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = server.serve(&on_connected, |_| {}) => {}
                }
            }
        });
        Self {
            addr,
            state,
            stop,
            task,
        }
    }

    /// Drops every open connection and listens again on the same port, as a PLC does after a
    /// reboot of its communication processor.
    async fn drop_connections(self) -> Self {
        let (addr, state) = (self.addr, Arc::clone(&self.state));
        self.stop().await;
        let listener = TcpListener::bind(addr).await.expect("rebind the same port");
        Self::serve(listener, state)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the fault server ends without panicking");
    }

    /// The requests received since the last call.
    fn take_requests(&self) -> Vec<(u16, u16)> {
        std::mem::take(&mut *lock(&self.state.requests))
    }

    fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    fn set_delay(&self, delay: Duration) {
        *lock(&self.state.delay) = delay;
    }
}

/// A TCP server that answers every request with bytes that are not a Modbus frame (what a
/// device behind a misconfigured serial gateway or a web server on port 502 sends).
struct JunkServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JunkServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 260];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0
                            || stream
                                .write_all(b"\xff\xfe\x13\x37HTTP/1.1 400 Bad Request\r\n\r\n")
                                .await
                                .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    /// Stops listening; the port is free for a real server afterwards.
    async fn stop(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

fn holding(name: &str, address: u16, data_type: DataType) -> ModbusTag {
    ModbusTag::new(name, RegisterKind::Holding, address, data_type)
}

fn device(name: &str, addr: SocketAddr, tags: Vec<ModbusTag>) -> ModbusDevice {
    ModbusDevice {
        name: name.to_owned(),
        host: addr.ip().to_string(),
        port: addr.port(),
        unit_id: 1,
        bus: None,
        inter_frame_delay: None,
        // Long enough that a whole tick's requests are in before the next tick starts, so the
        // requests of one tick can be counted exactly.
        poll_interval: ConfigDuration::from_millis(400),
        timeout: ConfigDuration::from_millis(300),
        addressing: edge_agent::config::Addressing::ZeroBased,
        max_gap: ModbusDevice::DEFAULT_MAX_GAP,
        max_registers_per_request: None,
        max_bits_per_request: None,
        tags,
    }
}

/// `(tag, quality, value)` of each reading of a tick, to compare with [`expect`].
fn triples(round: Vec<Reading>) -> Vec<(String, Quality, Option<f64>)> {
    round
        .into_iter()
        .map(|r| (r.tag, r.quality, r.value))
        .collect()
}

/// `press-3` with two u16 tags, `a` at holding 0 and `b` at holding 1.
fn two_tag_device(addr: SocketAddr) -> ModbusDevice {
    device(
        "press-3",
        addr,
        vec![
            holding("a", 0, DataType::U16),
            holding("b", 1, DataType::U16),
        ],
    )
}

/// The tick of [`two_tag_device`]: good with these values, or bad.
fn two_tags(values: Option<(f64, f64)>) -> Vec<(String, Quality, Option<f64>)> {
    match values {
        Some((a, b)) => expect(&[("a", Quality::Good, Some(a)), ("b", Quality::Good, Some(b))]),
        None => expect(&[("a", Quality::Bad, None), ("b", Quality::Bad, None)]),
    }
}

fn expect(rows: &[(&str, Quality, Option<f64>)]) -> Vec<(String, Quality, Option<f64>)> {
    rows.iter()
        .map(|&(name, quality, value)| (name.to_owned(), quality, value))
        .collect()
}

/// A healthy second device on its own server, polled every 100 ms, whose readings are
/// collected in the background.
struct Witness {
    plc: FaultPlc,
    poller: JoinHandle<()>,
    stop: CancellationToken,
    readings: Arc<Mutex<Vec<Reading>>>,
}

const WITNESS_INTERVAL_MS: i64 = 100;

impl Witness {
    async fn start() -> Self {
        let plc = FaultPlc::start(&[(0, 1234)]).await;
        let witness = ModbusDevice {
            poll_interval: ConfigDuration::from_millis(100),
            ..device(
                "witness",
                plc.addr,
                vec![holding("level", 0, DataType::U16)],
            )
        };
        let (tx, mut rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let readings = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&readings);
        tokio::spawn(async move {
            while let Some(reading) = rx.recv().await {
                lock(&sink).push(reading);
            }
        });
        let poller = tokio::spawn(run_device(witness, tx, stop.clone()));
        Self {
            plc,
            poller,
            stop,
            readings,
        }
    }

    /// Asserts that every reading since `since_us` is good with the exact value, and that no
    /// two consecutive ticks (nor the last tick and now) are far more than one interval apart.
    fn assert_on_time(&self, since_us: i64) {
        let readings = lock(&self.readings);
        let window: Vec<&Reading> = readings.iter().filter(|r| r.ts_us >= since_us).collect();
        assert!(
            window
                .iter()
                .all(|r| r.quality == Quality::Good && r.value == Some(1234.0)),
            "{window:?}"
        );
        let mut ticks: Vec<i64> = vec![since_us];
        ticks.extend(window.iter().map(|r| r.ts_us));
        ticks.push(now_us());
        let longest = ticks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        // Five intervals of slack for a loaded test machine; a stalled device would miss the
        // seconds the faulty one spends in timeouts and backoff.
        assert!(
            longest <= 5 * WITNESS_INTERVAL_MS * 1000,
            "the witness went {longest} µs without a reading"
        );
        let span_ms = (now_us() - since_us) / 1000;
        assert!(
            i64::try_from(window.len()).unwrap() >= span_ms / WITNESS_INTERVAL_MS / 2,
            "{} readings in {span_ms} ms",
            window.len()
        );
    }

    async fn stop(self) {
        self.stop.cancel();
        self.poller
            .await
            .expect("the witness ends without panicking");
        self.plc.stop().await;
    }
}

#[tokio::test]
async fn coalesces_neighbouring_tags_into_the_exact_requests_of_the_plan() {
    let plc = FaultPlc::start(&[
        (0, 7),
        (1, 0xFFFE),
        // 1.5f32, ABCD
        (2, 0x3FC0),
        (3, 0),
        (4, 0),
        (5, 0),
        (6, 0),
        (7, 0),
        (8, 0),
        (9, 0),
        // 4_000_000_000u32, ABCD
        (10, 0xEE6B),
        (11, 0x2800),
        (30, 30),
        (31, 31),
    ])
    .await;
    let mut poller = Poller::start(device(
        "press-3",
        plc.addr,
        vec![
            holding("count", 0, DataType::U16),
            holding("delta", 1, DataType::I16),
            holding("temp", 2, DataType::F32),
            // Six unused registers (4-9) are read along.
            holding("energy", 10, DataType::U32),
            // Eighteen unused registers: a request of its own, shared with its neighbour.
            holding("a", 30, DataType::U16),
            holding("b", 31, DataType::U16),
        ],
    ));
    for _ in 0..3 {
        let round = triples(poller.round().await);
        assert_eq!(
            round,
            expect(&[
                ("count", Quality::Good, Some(7.0)),
                ("delta", Quality::Good, Some(-2.0)),
                ("temp", Quality::Good, Some(1.5)),
                ("energy", Quality::Good, Some(4e9)),
                ("a", Quality::Good, Some(30.0)),
                ("b", Quality::Good, Some(31.0)),
            ])
        );
        // Two requests per tick for six tags, against six one by one.
        assert_eq!(plc.take_requests(), vec![(0, 12), (30, 2)]);
    }
    assert_eq!(plc.connections(), 1);
    poller.stop().await;
    plc.stop().await;
}

// One device, one story told tick by tick; the exact request lists are the point.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn splits_a_range_refused_with_illegal_data_address_and_remembers_the_holes() {
    let witness = Witness::start().await;
    let since = now_us();
    let plc = FaultPlc::start(&[
        (0, 10),
        (1, 11),
        // no register 2
        (3, 13),
        (4, 14),
        (5, 15),
        (100, 100),
        // no registers 101-103
        (104, 104),
        (200, 200),
        (201, 201),
        (300, 30),
        (301, 31),
        (302, 32),
        (303, 33),
        (304, 34),
        // no register 305
        (306, 36),
    ])
    .await;
    *lock(&plc.state.refuse) = Some((201, ExceptionCode::ServerDeviceFailure));
    let mut poller = Poller::start(device(
        "press-3",
        plc.addr,
        vec![
            holding("a", 0, DataType::U16),
            holding("b", 1, DataType::U16),
            holding("hole", 2, DataType::U16),
            holding("c", 3, DataType::U16),
            holding("d", 4, DataType::U16),
            holding("e", 5, DataType::U16),
            holding("g", 100, DataType::U16),
            holding("h", 104, DataType::U16),
            holding("failing_1", 200, DataType::U16),
            holding("failing_2", 201, DataType::U16),
            holding("p", 300, DataType::U16),
            holding("q", 302, DataType::U16),
            holding("r", 304, DataType::U16),
            holding("s", 306, DataType::U16),
        ],
    ));
    let expected = expect(&[
        ("a", Quality::Good, Some(10.0)),
        ("b", Quality::Good, Some(11.0)),
        ("hole", Quality::Bad, None),
        ("c", Quality::Good, Some(13.0)),
        ("d", Quality::Good, Some(14.0)),
        ("e", Quality::Good, Some(15.0)),
        ("g", Quality::Good, Some(100.0)),
        ("h", Quality::Good, Some(104.0)),
        ("failing_1", Quality::Bad, None),
        ("failing_2", Quality::Bad, None),
        ("p", Quality::Good, Some(30.0)),
        ("q", Quality::Good, Some(32.0)),
        ("r", Quality::Good, Some(34.0)),
        ("s", Quality::Good, Some(36.0)),
    ]);

    assert_eq!(triples(poller.round().await), expected);
    assert_eq!(
        plc.take_requests(),
        vec![
            // Refused, then halved down to the tag the device does not have.
            (0, 6),
            (0, 3),
            (0, 1),
            (1, 2),
            (1, 1),
            (2, 1),
            (3, 3),
            // Refused for the registers between two tags it does have.
            (100, 5),
            (100, 1),
            (104, 1),
            // Another exception fails the request's tags; splitting would not help.
            (200, 2),
            // The missing register is in the second half: only that half's split is learned.
            (300, 7),
            (300, 3),
            (304, 3),
            (304, 1),
            (306, 1),
        ]
    );
    // The next ticks send the learned plan: the hole alone, nothing across 101-103.
    for _ in 0..2 {
        assert_eq!(triples(poller.round().await), expected);
        assert_eq!(
            plc.take_requests(),
            vec![
                (0, 2),
                (2, 1),
                (3, 3),
                (100, 1),
                (104, 1),
                (200, 2),
                (300, 5),
                (306, 1)
            ]
        );
    }

    // The PLC program grows register 2: the tag answers alone, and joins its neighbours again.
    lock(&plc.state.holding).insert(2, 12);
    let mut recovered = expected.clone();
    recovered[2] = ("hole".to_owned(), Quality::Good, Some(12.0));
    assert_eq!(triples(poller.round().await), recovered);
    assert_eq!(
        plc.take_requests(),
        vec![
            (0, 2),
            (2, 1),
            (3, 3),
            (100, 1),
            (104, 1),
            (200, 2),
            (300, 5),
            (306, 1)
        ]
    );
    assert_eq!(triples(poller.round().await), recovered);
    assert_eq!(
        plc.take_requests(),
        vec![(0, 6), (100, 1), (104, 1), (200, 2), (300, 5), (306, 1)]
    );
    assert_eq!(plc.connections(), 1, "exceptions never cost the connection");

    witness.assert_on_time(since);
    poller.stop().await;
    plc.stop().await;
    witness.stop().await;
}

#[tokio::test]
async fn slow_answers_read_bad_then_recover_while_other_devices_stay_on_time() {
    let witness = Witness::start().await;
    let since = now_us();
    let plc = FaultPlc::start(&[(0, 1), (1, 2)]).await;
    let mut poller = Poller::start(two_tag_device(plc.addr));
    let good = two_tags(Some((1.0, 2.0)));
    let bad = two_tags(None);
    assert_eq!(triples(poller.round().await), good);

    // Answers later than the 300 ms timeout: the tick reads bad, and so do the ticks while
    // the poller reconnects, because a late answer must not be taken for the next request's.
    plc.set_delay(Duration::from_millis(800));
    assert_eq!(triples(poller.round_with(Quality::Bad).await), bad);
    assert_eq!(triples(poller.round().await), bad);
    let connections = plc.connections();
    assert_eq!(triples(poller.round_with(Quality::Bad).await), bad);

    plc.set_delay(Duration::ZERO);
    assert_eq!(triples(poller.round_with(Quality::Good).await), good);
    assert_eq!(triples(poller.round().await), good);
    assert!(
        plc.connections() > connections,
        "reconnected after the timeouts"
    );

    witness.assert_on_time(since);
    poller.stop().await;
    plc.stop().await;
    witness.stop().await;
}

#[tokio::test]
async fn dropped_connections_reconnect_while_other_devices_stay_on_time() {
    let witness = Witness::start().await;
    let since = now_us();
    let plc = FaultPlc::start(&[(0, 1), (1, 2)]).await;
    let mut poller = Poller::start(two_tag_device(plc.addr));
    let good = two_tags(Some((1.0, 2.0)));
    assert_eq!(triples(poller.round().await), good);
    assert_eq!(plc.connections(), 1);

    let plc = plc.drop_connections().await;
    // The tick that finds the connection broken reads bad (and so may the ticks of the
    // reconnect delay); then readings are good again on a new connection.
    let bad = two_tags(None);
    assert_eq!(triples(poller.round_with(Quality::Bad).await), bad);
    assert_eq!(triples(poller.round_with(Quality::Good).await), good);
    assert_eq!(triples(poller.round().await), good);
    assert_eq!(plc.connections(), 2);

    witness.assert_on_time(since);
    poller.stop().await;
    plc.stop().await;
    witness.stop().await;
}

#[tokio::test]
async fn garbage_answers_read_bad_and_reconnect_while_other_devices_stay_on_time() {
    let witness = Witness::start().await;
    let since = now_us();
    let junk = JunkServer::start().await;
    let mut poller = Poller::start(two_tag_device(junk.addr));
    let bad = two_tags(None);
    for _ in 0..6 {
        assert_eq!(triples(poller.round().await), bad);
    }
    // Each junk answer drops the connection; the poller keeps trying, with backoff.
    let connections = junk.connections.load(Ordering::SeqCst);
    assert!(connections >= 2, "{connections} connections");

    // The right device appears at that address: readings are good again by themselves.
    let addr = junk.stop().await;
    let state = Arc::new(PlcState::default());
    lock(&state.holding).extend([(0, 1), (1, 2)]);
    let plc = FaultPlc::serve(
        TcpListener::bind(addr).await.expect("rebind the junk port"),
        state,
    );
    let good = two_tags(Some((1.0, 2.0)));
    assert_eq!(triples(poller.round_with(Quality::Good).await), good);

    witness.assert_on_time(since);
    poller.stop().await;
    plc.stop().await;
    witness.stop().await;
}

#[tokio::test]
async fn a_read_refused_as_too_long_is_split_and_the_device_limit_is_learned() {
    let witness = Witness::start().await;
    let since = now_us();
    let registers: Vec<(u16, u16)> = (0..100).map(|a| (a, a + 1000)).collect();
    let plc = FaultPlc::start(&registers).await;
    *lock(&plc.state.max_count) = Some(40);
    let tags: Vec<ModbusTag> = (0..100)
        .map(|a| holding(&format!("t{a}"), a, DataType::U16))
        .collect();
    let expected: Vec<(String, Quality, Option<f64>)> = (0..100)
        .map(|a| (format!("t{a}"), Quality::Good, Some(f64::from(a + 1000))))
        .collect();
    let mut poller = Poller::start(device("meter", plc.addr, tags.clone()));

    // Every tag reads good in the very first tick: the refused reads are halved until the
    // device answers them.
    assert_eq!(triples(poller.round().await), expected);
    assert_eq!(
        plc.take_requests(),
        vec![
            (0, 100),
            (0, 50),
            (0, 25),
            (25, 25),
            (50, 50),
            (50, 25),
            (75, 25),
        ]
    );
    // From then on no request is longer than the largest one it answered below the refusals.
    for _ in 0..2 {
        assert_eq!(triples(poller.round().await), expected);
        assert_eq!(
            plc.take_requests(),
            vec![(0, 25), (25, 25), (50, 25), (75, 25)]
        );
    }
    assert_eq!(plc.connections(), 1, "a refusal never costs the connection");
    poller.stop().await;

    // The limit from the device's manual: never refused at all.
    let mut poller = Poller::start(ModbusDevice {
        max_registers_per_request: Some(40),
        ..device("meter", plc.addr, tags)
    });
    for _ in 0..2 {
        assert_eq!(triples(poller.round().await), expected);
        assert_eq!(plc.take_requests(), vec![(0, 40), (40, 40), (80, 20)]);
    }
    poller.stop().await;

    witness.assert_on_time(since);
    plc.stop().await;
    witness.stop().await;
}

#[tokio::test]
async fn a_single_tag_refused_with_illegal_data_value_is_read_alone_and_teaches_no_limit() {
    let plc = FaultPlc::start(&[(0, 1), (1, 2), (2, 3), (3, 4), (10, 7)]).await;
    *lock(&plc.state.max_count) = Some(2);
    let mut poller = Poller::start(device(
        "meter",
        plc.addr,
        vec![
            holding("wide", 0, DataType::U64),
            holding("narrow", 10, DataType::U16),
        ],
    ));
    let round = expect(&[
        ("wide", Quality::Bad, None),
        ("narrow", Quality::Good, Some(7.0)),
    ]);
    assert_eq!(triples(poller.round().await), round);
    assert_eq!(plc.take_requests(), vec![(0, 11), (0, 4), (10, 1)]);
    // The tag refused alone is read alone; its refusal was not about the length of the
    // merged read, so no limit was learned (a limit of one register would split everything).
    for _ in 0..2 {
        assert_eq!(triples(poller.round().await), round);
        assert_eq!(plc.take_requests(), vec![(0, 4), (10, 1)]);
    }
    poller.stop().await;
    let mut poller = Poller::start(device(
        "meter",
        plc.addr,
        vec![
            holding("narrow", 10, DataType::U16),
            holding("next", 11, DataType::U16),
            holding("wide", 0, DataType::U64),
        ],
    ));
    lock(&plc.state.holding).insert(11, 8);
    poller.round().await;
    poller.round().await;
    let _ = plc.take_requests();
    poller.round().await;
    assert_eq!(
        plc.take_requests(),
        vec![(0, 4), (10, 2)],
        "two-register reads are still merged"
    );
    poller.stop().await;
    plc.stop().await;
}

/// One device's poller that keeps what it learns in the buffer file at `buffer`, as the agent
/// runs it.
struct Remembering {
    rx: mpsc::Receiver<Reading>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    tags: usize,
}

impl Remembering {
    fn start(device: ModbusDevice, buffer: &std::path::Path) -> Self {
        let tags = device.tags.len();
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_device_with_memory(
            device,
            buffer.to_owned(),
            tx,
            stop.clone(),
        ));
        Self {
            rx,
            stop,
            task,
            tags,
        }
    }

    async fn round(&mut self) -> Vec<(String, Quality, Option<f64>)> {
        let mut round = Vec::new();
        for _ in 0..self.tags {
            let reading = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
                .await
                .expect("a reading within 10 s")
                .expect("the poller is running");
            round.push(reading);
        }
        triples(round)
    }

    /// Stops the poller; it has saved what it learned by the time it ends.
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("the poller ends without panicking");
    }
}

// One device across three starts; the exact request lists of each first tick are the point.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn a_learned_plan_survives_a_restart_and_a_changed_map_starts_afresh() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let buffer = dir.path().join("buffer.db");
    drop(
        edge_agent::buffer::Buffer::open(
            &buffer,
            edge_agent::config::Durability::Full,
            "gw-faults",
        )
        .expect("a fresh buffer"),
    );
    let plc = FaultPlc::start(&[
        (0, 10),
        (1, 11),
        // no register 2
        (3, 13),
        (4, 14),
        (5, 15),
        (100, 100),
        (104, 104),
        (200, 200),
    ])
    .await;
    // Reads of more than four registers are refused as too long.
    *lock(&plc.state.max_count) = Some(4);
    let tags = vec![
        holding("a", 0, DataType::U16),
        holding("b", 1, DataType::U16),
        holding("hole", 2, DataType::U16),
        holding("c", 3, DataType::U16),
        holding("d", 4, DataType::U16),
        holding("e", 5, DataType::U16),
        holding("g", 100, DataType::U16),
        holding("h", 104, DataType::U16),
    ];
    let expected = expect(&[
        ("a", Quality::Good, Some(10.0)),
        ("b", Quality::Good, Some(11.0)),
        ("hole", Quality::Bad, None),
        ("c", Quality::Good, Some(13.0)),
        ("d", Quality::Good, Some(14.0)),
        ("e", Quality::Good, Some(15.0)),
        ("g", Quality::Good, Some(100.0)),
        ("h", Quality::Good, Some(104.0)),
    ]);
    let learned_plan = vec![(0, 2), (2, 1), (3, 3), (100, 1), (104, 1)];

    let mut first = Remembering::start(device("press-3", plc.addr, tags.clone()), &buffer);
    assert_eq!(first.round().await, expected);
    assert_eq!(
        plc.take_requests(),
        vec![
            // Six registers: too long. Its first half lacks register 2 ...
            (0, 6),
            (0, 3),
            (0, 1),
            (1, 2),
            (1, 1),
            (2, 1),
            // ... its second half is answered.
            (3, 3),
            // Five registers: too long; the halves are answered.
            (100, 5),
            (100, 1),
            (104, 1),
        ]
    );
    assert_eq!(first.round().await, expected);
    assert_eq!(plc.take_requests(), learned_plan);
    first.stop().await;

    // A restart: the first tick already sends the learned plan; nothing refused is asked again.
    let mut second = Remembering::start(device("press-3", plc.addr, tags.clone()), &buffer);
    assert_eq!(second.round().await, expected);
    assert_eq!(plc.take_requests(), learned_plan);
    second.stop().await;

    // A scale edit does not change which registers are read: the plan is kept.
    let mut rescaled = tags.clone();
    rescaled[0].scale = 0.1;
    let mut third = Remembering::start(device("press-3", plc.addr, rescaled), &buffer);
    let round = third.round().await;
    assert_eq!(round[0], ("a".to_owned(), Quality::Good, Some(1.0)));
    assert_eq!(plc.take_requests(), learned_plan);
    third.stop().await;

    // A new tag: the map changed, so the device is asked afresh and learns again.
    let mut grown = tags.clone();
    grown.push(holding("i", 200, DataType::U16));
    let mut fourth = Remembering::start(device("press-3", plc.addr, grown.clone()), &buffer);
    let mut grown_expected = expected.clone();
    grown_expected.push(("i".to_owned(), Quality::Good, Some(200.0)));
    assert_eq!(fourth.round().await, grown_expected);
    let requests = plc.take_requests();
    assert_eq!(requests[0], (0, 6), "{requests:?}");
    assert_eq!(requests.last(), Some(&(200, 1)));
    fourth.stop().await;

    // ... and that new plan is what the next start uses.
    let mut fifth = Remembering::start(device("press-3", plc.addr, grown), &buffer);
    assert_eq!(fifth.round().await, grown_expected);
    let mut grown_plan = learned_plan.clone();
    grown_plan.push((200, 1));
    assert_eq!(plc.take_requests(), grown_plan);
    fifth.stop().await;

    // The same device name at another address is another device: nothing is carried over.
    let other = FaultPlc::start(&[
        (0, 10),
        (1, 11),
        (3, 13),
        (4, 14),
        (5, 15),
        (100, 100),
        (104, 104),
    ])
    .await;
    let mut moved = Remembering::start(device("press-3", other.addr, tags), &buffer);
    assert_eq!(moved.round().await, expected);
    assert_eq!(other.take_requests()[0], (0, 6));
    moved.stop().await;
    other.stop().await;
    plc.stop().await;
}
