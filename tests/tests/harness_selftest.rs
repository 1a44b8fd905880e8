//! The harness itself: every peer starts, does one real round trip, and stops with its guard.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use arrow_array::{Int8Array, Int16Array, Int32Array, Int64Array};
use base64::Engine as _;
use pipeline_e2e::{
    ChildPeer, FakeSnow, Kinesalite, Mosquitto, MotoServer, PyModbusServer, Readiness,
    duckdb_query, free_port,
};
use serde_json::{Value, json};

#[test]
fn moto_stores_and_returns_an_object_in_a_fresh_bucket() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    assert!(bucket.starts_with("plantline-"), "bucket {bucket}");

    moto.put_object(
        &bucket,
        "raw/gw-1/00000000000000000001.parquet",
        b"PAR1 bytes",
    );
    moto.put_object(&bucket, "raw/gw-2/00000000000000000001.parquet", b"other");

    assert_eq!(
        moto.get_object(&bucket, "raw/gw-1/00000000000000000001.parquet"),
        Some(b"PAR1 bytes".to_vec())
    );
    assert_eq!(moto.get_object(&bucket, "raw/gw-1/missing.parquet"), None);
    assert_eq!(
        moto.list_keys(&bucket, "raw/gw-1/"),
        vec!["raw/gw-1/00000000000000000001.parquet".to_owned()]
    );

    let copy = tempfile::tempdir().expect("temporary folder");
    moto.download_prefix(&bucket, "raw/", copy.path());
    assert_eq!(
        std::fs::read(copy.path().join("gw-2/00000000000000000001.parquet"))
            .expect("downloaded object"),
        b"other"
    );
}

#[test]
fn pymodbus_answers_a_raw_read_holding_registers_request() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {"100": [17, 2, 65535]},
        "input": {"0": [5]},
    }));
    let mut stream = TcpStream::connect(plc.address()).expect("connect to the PLC");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");

    // MBAP: transaction 0x0007, protocol 0, length 6, unit 1; PDU: function 3, address 100, count 3.
    stream
        .write_all(&[
            0x00, 0x07, 0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x00, 0x64, 0x00, 0x03,
        ])
        .expect("send request");
    let mut response = [0u8; 15];
    stream.read_exact(&mut response).expect("read response");
    assert_eq!(
        response,
        [
            0x00, 0x07, 0x00, 0x00, 0x00, 0x09, 0x01, 0x03, 0x06, 0x00, 0x11, 0x00, 0x02, 0xFF,
            0xFF
        ]
    );

    // An address outside the map answers exception 2 (illegal data address), like a real PLC.
    stream
        .write_all(&[
            0x00, 0x08, 0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x00, 0x63, 0x00, 0x01,
        ])
        .expect("send request");
    let mut exception = [0u8; 9];
    stream.read_exact(&mut exception).expect("read exception");
    assert_eq!(
        exception,
        [0x00, 0x08, 0x00, 0x00, 0x00, 0x03, 0x01, 0x83, 0x02]
    );
}

#[test]
fn fakesnow_logs_in_and_selects_one() {
    let snow = FakeSnow::start();
    let login = post_json(
        snow.port(),
        "/session/v1/login-request",
        None,
        &json!({"data": {
            "ACCOUNT_NAME": "plantline",
            "LOGIN_NAME": "loader",
            "PASSWORD": "secret",
            "SESSION_PARAMETERS": {},
        }}),
    );
    assert_eq!(login["success"], json!(true), "login: {login}");
    let token = login["data"]["token"]
        .as_str()
        .expect("login returns data.token");

    let result = post_json(
        snow.port(),
        "/queries/v1/query-request",
        Some(token),
        &json!({"sqlText": "SELECT 1 AS ONE"}),
    );
    assert_eq!(result["success"], json!(true), "query: {result}");
    assert_eq!(result["data"]["rowtype"][0]["name"], json!("ONE"));
    let rowset = result["data"]["rowsetBase64"]
        .as_str()
        .expect("SELECT returns Arrow rows");
    let ipc = base64::engine::general_purpose::STANDARD
        .decode(rowset)
        .expect("valid base64");
    let mut values = Vec::new();
    for batch in
        arrow_ipc::reader::StreamReader::try_new(ipc.as_slice(), None).expect("Arrow IPC stream")
    {
        let batch = batch.expect("record batch");
        values.extend(integers(batch.column(0).as_ref()));
    }
    assert_eq!(values, vec![1]);
}

#[test]
fn duckdb_selects_42_with_the_delta_extension_loaded() {
    assert_eq!(
        duckdb_query("SELECT 42 AS answer"),
        vec![json!({"answer": 42})]
    );
    assert_eq!(
        duckdb_query(
            "SELECT extension_name FROM duckdb_extensions() WHERE loaded AND extension_name = 'delta'"
        ),
        vec![json!({"extension_name": "delta"})]
    );
}

#[test]
fn a_peer_that_exits_early_fails_with_its_stderr() {
    let port = free_port();
    let outcome = std::panic::catch_unwind(|| {
        ChildPeer::spawn(
            "doomed",
            "/bin/sh",
            ["-c", "echo 'bind failed: address in use' >&2; exit 3"],
            &Readiness::Port(port),
            None,
        )
    });
    let message = *outcome
        .expect_err("spawn must panic")
        .downcast::<String>()
        .expect("a formatted message");
    assert!(
        message.starts_with("the doomed peer exited with exit status: 3"),
        "{message}"
    );
    assert!(
        message.ends_with("--- doomed stderr (last lines) ---\nbind failed: address in use"),
        "{message}"
    );
}

#[test]
fn dropping_the_guard_kills_the_peer() {
    let port = free_port();
    let peer = ChildPeer::spawn(
        "listener",
        "python3",
        [
            "-c",
            &format!(
                "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(600)"
            ),
        ],
        &Readiness::Port(port),
        None,
    );
    let pid = peer.pid();
    drop(peer);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts"
    );
}

fn integers(column: &dyn arrow_array::Array) -> Vec<i64> {
    let any = column.as_any();
    if let Some(a) = any.downcast_ref::<Int8Array>() {
        a.iter().map(|v| i64::from(v.expect("not null"))).collect()
    } else if let Some(a) = any.downcast_ref::<Int16Array>() {
        a.iter().map(|v| i64::from(v.expect("not null"))).collect()
    } else if let Some(a) = any.downcast_ref::<Int32Array>() {
        a.iter().map(|v| i64::from(v.expect("not null"))).collect()
    } else if let Some(a) = any.downcast_ref::<Int64Array>() {
        a.iter().map(|v| v.expect("not null")).collect()
    } else {
        panic!("unexpected Arrow type {:?}", column.data_type())
    }
}

/// A minimal HTTP/1.1 JSON POST over std: the Snowflake driver protocol as fakesnow serves it.
fn post_json(port: u16, path: &str, token: Option<&str>, body: &Value) -> Value {
    let body = body.to_string();
    let auth = token
        .map(|t| format!("Authorization: Snowflake Token=\"{t}\"\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to fakesnow");
    stream
        .set_read_timeout(Some(Duration::from_mins(1)))
        .expect("set timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, payload) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response has a header block");
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{path}: chunked responses are not expected from fakesnow: {head}"
    );
    serde_json::from_str(payload).unwrap_or_else(|error| panic!("{path}: {error}: {payload}"))
}

#[test]
fn pymodbus_answers_over_rtu_through_a_socat_pty_pair() {
    let plc = PyModbusServer::start_rtu(&json!({"device_id": 1, "holding": {"100": [17, 2]}}));
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(plc.serial_path())
        .expect("open the gateway end of the pty pair");
    let mut request = vec![0x01, 0x03, 0x00, 0x64, 0x00, 0x02];
    request.extend_from_slice(&modbus_crc(&request).to_le_bytes());
    port.write_all(&request).expect("send RTU request");

    // A pty has no read timeout; read on a thread and give up after a deadline.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut response = [0u8; 9];
        let _ = sender.send(port.read_exact(&mut response).map(|()| response));
    });
    let response = receiver
        .recv_timeout(Duration::from_secs(20))
        .expect("the RTU server answers within 20 s")
        .expect("read RTU response");
    let mut expected = vec![0x01, 0x03, 0x04, 0x00, 0x11, 0x00, 0x02];
    expected.extend_from_slice(&modbus_crc(&expected).to_le_bytes());
    assert_eq!(response.to_vec(), expected);
}

#[test]
fn mosquitto_accepts_an_mqtt_connect() {
    let broker = Mosquitto::start();
    let mut stream = TcpStream::connect(broker.address()).expect("connect to the broker");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 60 s, client id "selftest".
    let mut connect = vec![
        0x10, 20, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x08,
    ];
    connect.extend_from_slice(b"selftest");
    stream.write_all(&connect).expect("send CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("read CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
}

/// Modbus RTU's CRC-16 (polynomial 0xA001 reflected, initial value 0xFFFF), sent low byte first.
fn modbus_crc(frame: &[u8]) -> u16 {
    frame.iter().fold(0xFFFF_u16, |crc, &byte| {
        (0..8).fold(crc ^ u16::from(byte), |crc, _| {
            if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            }
        })
    })
}

#[test]
fn kinesalite_returns_a_put_record_with_an_aws_shaped_sequence_number() {
    let kinesalite = Kinesalite::start();
    assert_eq!(
        kinesalite.endpoint(),
        format!("http://127.0.0.1:{}", kinesalite.port())
    );
    let port = kinesalite.port();
    let stream = format!("plantline-{}", std::process::id());
    kinesis_call(
        port,
        "CreateStream",
        &json!({"StreamName": stream, "ShardCount": 1}),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kinesis_call(
        port,
        "DescribeStreamSummary",
        &json!({"StreamName": stream}),
    )["StreamDescriptionSummary"]["StreamStatus"]
        != "ACTIVE"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{stream} not ACTIVE in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let data = base64::engine::general_purpose::STANDARD.encode(b"{\"seq\":1}\n");
    let put = kinesis_call(
        port,
        "PutRecord",
        &json!({"StreamName": stream, "PartitionKey": "press-3", "Data": data}),
    );
    let sequence = put["SequenceNumber"]
        .as_str()
        .expect("PutRecord returns SequenceNumber");
    assert!(
        sequence.len() == 56 && sequence.bytes().all(|b| b.is_ascii_digit()),
        "{sequence}"
    );

    let iterator = kinesis_call(
        port,
        "GetShardIterator",
        &json!({"StreamName": stream, "ShardId": put["ShardId"], "ShardIteratorType": "TRIM_HORIZON"}),
    );
    let records = kinesis_call(
        port,
        "GetRecords",
        &json!({"ShardIterator": iterator["ShardIterator"]}),
    );
    assert_eq!(
        records["Records"],
        json!([{
            "PartitionKey": "press-3",
            "Data": data,
            "SequenceNumber": sequence,
            "ApproximateArrivalTimestamp": records["Records"][0]["ApproximateArrivalTimestamp"],
        }])
    );

    kinesalite.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts after stop()"
    );
}

/// One Kinesis JSON 1.1 call over std. kinesalite wants a signature-shaped `Authorization` header
/// but checks no signature, so a fixed one does.
fn kinesis_call(port: u16, operation: &str, body: &Value) -> Value {
    let body = body.to_string();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-amz-json-1.1\r\n\
         X-Amz-Target: Kinesis_20131202.{operation}\r\nX-Amz-Date: 20260101T000000Z\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kinesis/aws4_request, \
         SignedHeaders=host, Signature=00\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to kinesalite");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, payload) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response has a header block");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{operation}: {head}\n{payload}"
    );
    if payload.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(payload).unwrap_or_else(|error| panic!("{operation}: {error}: {payload}"))
}
