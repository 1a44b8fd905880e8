//! The agent under systemd's `Type=notify` with `WatchdogSec=`: the test plays systemd's side of
//! the protocol on a real datagram socket (`NOTIFY_SOCKET`) and runs the real binary.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every datagram the agent sends until `until` holds for one of them, or the deadline passes.
fn receive_until(
    socket: &UnixDatagram,
    deadline: Duration,
    until: impl Fn(&str) -> bool,
) -> Vec<String> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&message);
                got.push(message);
                if done {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("receiving from the notify socket: {e}"),
        }
    }
    got
}

#[test]
fn the_agent_reports_ready_feeds_the_watchdog_and_says_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        r#"site = "plant-ost"
gateway = "gw-systemd"

[upload.dir]
path = "landing"

[metrics]
enabled = false
"#,
    )
    .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        // A 1 s watchdog: pings every 0.5 s.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let first = receive_until(&socket, Duration::from_secs(30), |_| true);
    assert_eq!(first.len(), 1, "no READY=1 within 30 s");
    assert!(
        first[0].lines().any(|l| l == "READY=1"),
        "the first message is the readiness: {first:?}"
    );
    assert!(first[0].contains("STATUS=collecting for gateway gw-systemd"));

    // About four pings in two seconds at a 0.5 s interval; at least three even on a busy machine.
    let mut pings = 0;
    let window = Instant::now();
    let got = receive_until(&socket, Duration::from_secs(10), |m| {
        m == "WATCHDOG=1" && window.elapsed() >= Duration::from_secs(2)
    });
    pings += got.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 3, "too few watchdog pings: {got:?}");
    assert!(
        got.iter().all(|m| m == "WATCHDOG=1"),
        "a healthy agent only pings: {got:?}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let last = receive_until(&socket, Duration::from_secs(30), |m| {
        m.starts_with("STOPPING=1")
    });
    assert!(
        last.last().is_some_and(|m| m.starts_with("STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {last:?}"
    );
    assert!(agent.wait().unwrap().success());
}

#[test]
fn without_a_notify_socket_the_agent_runs_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "site = \"plant-ost\"\ngateway = \"gw-plain\"\n\n[upload.dir]\npath = \"landing\"\n\n[metrics]\nenabled = false\n",
    )
    .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent keeps running"
    );
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    let out = agent.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("sd_notify"), "{stderr}");
}
