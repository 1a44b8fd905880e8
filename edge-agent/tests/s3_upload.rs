//! Uploads to S3 at production depth, against moto server: multipart above the threshold with
//! byte-identical retries, aborted uploads that leave no parts behind, bodies changed on the
//! way that are refused and sent again, storage class and server-side encryption on the
//! objects, and the bandwidth cap.
//!
//! Faults are injected by a small TCP proxy between the agent and moto that reads the HTTP
//! requests going through it: it can drop a connection instead of forwarding a request, or flip
//! one byte of a request's body. moto 5.2 does not check `x-amz-checksum-crc32c` or
//! `Content-MD5` against the body (it stores what arrives and echoes the checksum it was sent),
//! so a flipped byte is stored; the agent must see it in the ETag, the MD5 of what was stored.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::types::{ChecksumMode, ServerSideEncryption, StorageClass};
use bytes::Bytes;
use edge_agent::Reading;
use edge_agent::batch::{Batcher, encode, read_rows};
use edge_agent::buffer::Buffer;
use edge_agent::config::{BatchConfig, ConfigDuration, Durability, load_str};
use edge_agent::contract::{BatchKey, Quality};
use edge_agent::sinks::{BatchSink, S3Sink};
use md5::Digest as _;
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

/// An S3 client of the test's own, to look at what landed (head, list uploads).
fn inspector(moto: &MotoServer) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(S3_REGION))
        .credentials_provider(Credentials::new(
            S3_ACCESS_KEY_ID,
            S3_SECRET_ACCESS_KEY,
            None,
            None,
            "plantline-test",
        ))
        .endpoint_url(moto.endpoint())
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The agent's S3 sink for `bucket` at `endpoint`, with extra `[upload.s3]` lines.
async fn sink(endpoint: &str, bucket: &str, extra: &str) -> BatchSink {
    let text = format!(
        "site = \"plant-a\"\ngateway = \"gw-1\"\n[upload.s3]\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\nregion = \"{S3_REGION}\"\ntimeout = \"20s\"\n{extra}\n"
    );
    let config = load_str(&text, std::path::Path::new("agent.toml"))
        .unwrap_or_else(|e| panic!("test config is valid: {e}"));
    let s3 = config.upload.s3.expect("the config has [upload.s3]");
    BatchSink::S3(
        S3Sink::with_static_credentials(&s3, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY).await,
    )
}

/// Bytes that do not compress, so a Parquet batch or a raw body has the size asked for.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64*: cheap, deterministic, far from compressible.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The fault proxy.

/// What the proxy does to a request that matches a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Close the connection instead of forwarding the request (a link that went away).
    Drop,
    /// Forward the request with one byte in the middle of its body flipped.
    Corrupt,
}

struct Rule {
    /// Text the request line (`PUT /bucket/key?partNumber=2&... HTTP/1.1`) must contain.
    contains: String,
    fault: Fault,
    times: usize,
}

#[derive(Default)]
struct ProxyState {
    rules: Vec<Rule>,
    /// Every request line seen, in order.
    seen: Vec<String>,
    faults_done: usize,
}

#[derive(Clone)]
struct FaultProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
}

impl FaultProxy {
    async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(relay(client, upstream_port, Arc::clone(&shared)));
            }
        });
        Self { port, state }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn add(&self, contains: &str, fault: Fault, times: usize) {
        self.state.lock().unwrap().rules.push(Rule {
            contains: contains.to_owned(),
            fault,
            times,
        });
    }

    /// Request lines seen so far that contain `text`.
    fn count(&self, text: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.seen.iter().filter(|l| l.contains(text)).count()
    }

    fn faults_done(&self) -> usize {
        self.state.lock().unwrap().faults_done
    }
}

/// Relays one client connection: requests are read one at a time (header, then exactly
/// `Content-Length` bytes of body) and judged by the rules; answers are copied back unchanged.
async fn relay(mut client: TcpStream, upstream_port: u16, state: Arc<Mutex<ProxyState>>) {
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let (mut up_read, mut up_write) = upstream.into_split();
    let (mut client_read, mut client_write) = client.split();
    let answers = async {
        let _ = tokio::io::copy(&mut up_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    let requests = async {
        let mut pending = Vec::new();
        loop {
            // The header of the next request.
            let header_end = loop {
                if let Some(i) = find(&pending, b"\r\n\r\n") {
                    break i + 4;
                }
                let mut buf = [0u8; 8192];
                match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            };
            let header: Vec<u8> = pending.drain(..header_end).collect();
            let text = String::from_utf8_lossy(&header).into_owned();
            let line = text.lines().next().unwrap_or_default().to_owned();
            let length = text
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while pending.len() < length {
                let mut buf = vec![0u8; 65536];
                match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            let mut body: Vec<u8> = pending.drain(..length).collect();
            let fault = {
                let mut state = state.lock().unwrap();
                state.seen.push(line.clone());
                let fault = state
                    .rules
                    .iter_mut()
                    .find(|r| r.times > 0 && line.contains(&r.contains))
                    .map(|r| {
                        r.times -= 1;
                        r.fault
                    });
                if fault.is_some() {
                    state.faults_done += 1;
                }
                fault
            };
            match fault {
                Some(Fault::Drop) => return,
                Some(Fault::Corrupt) if !body.is_empty() => {
                    let middle = body.len() / 2;
                    body[middle] ^= 0x5a;
                }
                _ => {}
            }
            if up_write.write_all(&header).await.is_err()
                || up_write.write_all(&body).await.is_err()
            {
                return;
            }
        }
    };
    // A dropped request ends the relay, which closes both sockets.
    tokio::select! {
        () = answers => {}
        () = requests => {}
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------

fn big_readings(count: usize) -> Vec<Reading> {
    let noise = noise(count * 24, 7);
    (0..count)
        .map(|i| {
            let chunk = &noise[i * 24..(i + 1) * 24];
            Reading {
                ts_us: 1_700_000_000_000_000 + i64::try_from(i).unwrap() * 1000,
                device: "press-3".into(),
                // A tag name per reading that does not compress: the batch gets big quickly.
                tag: hex(&chunk[..16]),
                value: Some(f64::from_le_bytes(chunk[16..24].try_into().unwrap()).abs() % 1e6),
                value_text: None,
                quality: Quality::Good,
                unit: Some("bar".into()),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_goes_up_in_parts_and_a_retry_after_a_crash_writes_identical_bytes() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let proxy = FaultProxy::start(moto.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "multipart_threshold = \"5 MiB\"\npart_size = \"5 MiB\"";

    let buffer =
        Arc::new(Buffer::open(&dir.path().join("b.db"), Durability::Full, "gw-1").unwrap());
    buffer.append(&big_readings(400_000)).unwrap();
    // The first life: cuts the batch, uploads it, and dies before it could forget the rows.
    let batch = buffer.cut_batch(400_000, "plant-a").unwrap().unwrap();
    let rows = buffer.batch_rows(&batch).unwrap();
    let body = encode(&rows, &[]).unwrap();
    assert!(
        body.len() > 10 * MIB,
        "the batch must need three parts, it has {} bytes",
        body.len()
    );
    let key = BatchKey::new("gw-1", batch.first_seq).to_key("raw/");
    let first = sink(&proxy.endpoint(), &bucket, extra).await;
    first.put(&key, body.clone()).await.unwrap();
    drop(first);
    assert_eq!(
        proxy.count("?uploads HTTP"),
        1,
        "one multipart upload was started"
    );
    assert_eq!(
        proxy.count("partNumber="),
        3,
        "in three parts of 5 MiB and the rest"
    );
    let landed = moto.get_object(&bucket, &key).expect("the batch landed");
    assert_eq!(landed.len(), body.len());
    assert!(landed == body, "the object is the batch, byte for byte");
    drop(buffer);

    // The next life finds the batch still pending and sends it again, through the batcher.
    let buffer =
        Arc::new(Buffer::open(&dir.path().join("b.db"), Durability::Full, "gw-1").unwrap());
    assert_eq!(buffer.pending_batch().unwrap(), Some(batch.clone()));
    let mut batcher = Batcher::new(
        Arc::clone(&buffer),
        Arc::new(sink(&proxy.endpoint(), &bucket, extra).await),
        BatchConfig {
            max_rows: 400_000,
            max_age: ConfigDuration::from_secs(60),
            fresh_lane: false,
        },
        "plant-a".into(),
    );
    batcher.flush(Duration::from_mins(2)).await.unwrap();
    assert_eq!(buffer.stats().unwrap().rows, 0, "confirmed, so forgotten");
    assert_eq!(
        proxy.count("?uploads HTTP"),
        2,
        "the retry was a second multipart upload"
    );
    assert_eq!(proxy.count("partNumber="), 6);
    let again = moto.get_object(&bucket, &key).unwrap();
    assert!(
        again == body,
        "the retry wrote the same bytes under the same key"
    );
    assert_eq!(read_rows(Bytes::from(again)).unwrap(), rows);
    assert_eq!(
        moto.list_keys(&bucket, "raw/"),
        [key],
        "one object, no second key"
    );

    // What S3 reports for the object: the parts' composite CRC32C and the multipart ETag.
    let head = inspector(&moto)
        .head_object()
        .bucket(&bucket)
        .key(BatchKey::new("gw-1", batch.first_seq).to_key("raw/"))
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    // The multipart ETag is the MD5 of the parts' MD5s, computed by moto from the bytes it
    // received; the sink compared it with its own before it confirmed the batch. (moto's
    // composite CRC32C cannot be compared: without the optional `crc32c` Python package it
    // computes CRC32 under that name.)
    let part_md5s: Vec<u8> = body
        .chunks(5 * MIB)
        .flat_map(|part| md5::Md5::digest(part).to_vec())
        .collect();
    let expected = hex(&md5::Md5::digest(&part_md5s));
    assert_eq!(
        head.e_tag().unwrap().trim_matches('"'),
        format!("{expected}-3")
    );
    assert!(head.checksum_crc32_c().is_some(), "a CRC32C was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_aborts_the_upload_so_no_parts_are_left_and_the_retry_lands_intact() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let proxy = FaultProxy::start(moto.port()).await;
    let s3 = inspector(&moto);
    let sink = sink(
        &proxy.endpoint(),
        &bucket,
        "multipart_threshold = \"5 MiB\"\npart_size = \"5 MiB\"",
    )
    .await;
    let body = Bytes::from(noise(12 * MIB, 1));
    let key = "raw/gateway=gw-1/00000000000000000001.parquet";

    // Part 2 never gets through: more drops than the client's own retries.
    proxy.add("partNumber=2", Fault::Drop, 10);
    let err = sink.put(key, body.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("UploadPart 2 of 3"),
        "the error names the part: {err}"
    );
    assert!(
        proxy.count("x-id=AbortMultipartUpload") == 1,
        "the upload was aborted: {:?}",
        proxy.state.lock().unwrap().seen
    );
    let open = s3
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(open.uploads().len(), 0, "no parts left to be billed");
    assert_eq!(moto.get_object(&bucket, key), None, "nothing half-written");

    // A part changed on the way is refused by its ETag, and that upload aborted too.
    proxy.state.lock().unwrap().rules.clear();
    proxy.add("partNumber=3", Fault::Corrupt, 1);
    let err = sink.put(key, body.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("UploadPart 3 of 3") && err.contains("the stored bytes differ"),
        "{err}"
    );
    let open = s3
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(open.uploads().len(), 0);

    // Parts a crash left behind (an upload nobody aborted) go before the key is sent again.
    let orphan = s3
        .create_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    s3.upload_part()
        .bucket(&bucket)
        .key(key)
        .upload_id(orphan.upload_id().unwrap())
        .part_number(1)
        .body(Bytes::from(noise(MIB, 2)).into())
        .send()
        .await
        .unwrap();
    sink.put(key, body.clone()).await.unwrap();
    let open = s3
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        open.uploads().len(),
        0,
        "the orphan was aborted and the new upload completed"
    );
    assert!(moto.get_object(&bucket, key).unwrap() == body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_changed_on_the_way_is_refused_deleted_and_sent_again_by_the_batcher() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let proxy = FaultProxy::start(moto.port()).await;
    let sink = sink(&proxy.endpoint(), &bucket, "").await;
    let key = "raw/gateway=gw-1/00000000000000000001.parquet";
    let body = Bytes::from(noise(300_000, 3));

    proxy.add("x-id=PutObject", Fault::Corrupt, 1);
    let err = sink.put(key, body.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("PUT: the stored bytes differ from the batch (ETag "),
        "{err}"
    );
    assert_eq!(proxy.faults_done(), 1);
    assert_eq!(
        moto.get_object(&bucket, key),
        None,
        "moto stored the changed bytes (it checks no checksum); the agent deleted them again"
    );

    // Through the batcher's loop: the retry with backoff lands the real bytes.
    let dir = tempfile::tempdir().unwrap();
    let buffer =
        Arc::new(Buffer::open(&dir.path().join("b.db"), Durability::Full, "gw-1").unwrap());
    buffer.append(&big_readings(2000)).unwrap();
    proxy.add("x-id=PutObject", Fault::Corrupt, 2);
    let mut batcher = Batcher::new(
        Arc::clone(&buffer),
        Arc::new(sink),
        BatchConfig {
            max_rows: 5000,
            max_age: ConfigDuration::from_secs(1),
            fresh_lane: false,
        },
        "plant-a".into(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { batcher.run(stop).await }
    });
    let deadline = Instant::now() + Duration::from_mins(1);
    while buffer.stats().unwrap().rows > 0 {
        assert!(
            Instant::now() < deadline,
            "the batch was not confirmed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        proxy.faults_done(),
        3,
        "two refused attempts, then the good one"
    );
    let key = BatchKey::new("gw-1", 1).to_key("raw/");
    let rows = read_rows(Bytes::from(moto.get_object(&bucket, &key).unwrap())).unwrap();
    assert_eq!(rows.len(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_encryption_and_the_crc32c_reach_the_object() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let s3 = inspector(&moto);
    let body = Bytes::from(noise(1000, 4));
    for (extra, class, sse, kms) in [
        (
            "storage_class = \"STANDARD_IA\"\nsse = \"AES256\"",
            StorageClass::StandardIa,
            ServerSideEncryption::Aes256,
            None,
        ),
        (
            "storage_class = \"INTELLIGENT_TIERING\"\nsse = \"aws:kms\"\nkms_key_id = \"alias/plant-raw\"",
            StorageClass::IntelligentTiering,
            ServerSideEncryption::AwsKms,
            Some("alias/plant-raw"),
        ),
    ] {
        for (key, size, settings) in [
            ("raw/single.parquet", 1000, extra.to_owned()),
            (
                "raw/multi.parquet",
                11 * MIB,
                format!("{extra}\nmultipart_threshold = \"5 MiB\"\npart_size = \"5 MiB\""),
            ),
        ] {
            let body = if size == 1000 {
                body.clone()
            } else {
                Bytes::from(noise(size, 5))
            };
            let sink = sink(&moto.endpoint(), &bucket, &settings).await;
            sink.put(key, body.clone()).await.unwrap();
            let head = s3
                .head_object()
                .bucket(&bucket)
                .key(key)
                .checksum_mode(ChecksumMode::Enabled)
                .send()
                .await
                .unwrap();
            assert_eq!(head.storage_class(), Some(&class), "{key} {extra}");
            assert_eq!(head.server_side_encryption(), Some(&sse), "{key} {extra}");
            assert_eq!(head.ssekms_key_id(), kms, "{key} {extra}");
            assert!(
                head.checksum_crc32_c().is_some(),
                "{key}: a CRC32C was sent"
            );
            assert!(moto.get_object(&bucket, key).unwrap() == body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_cap_slows_uploads_to_the_configured_rate() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let sink = sink(
        &moto.endpoint(),
        &bucket,
        "max_bytes_per_second = \"256 KiB\"",
    )
    .await;
    let body = Bytes::from(noise(MIB, 6));
    let started = Instant::now();
    sink.put("raw/capped.parquet", body.clone()).await.unwrap();
    let took = started.elapsed();
    // 1 MiB at 256 KiB/s: the last 16 KiB chunk may leave after 3.94 s, not before. Only the
    // lower bound is asserted; a busy machine may take longer.
    assert!(
        took >= Duration::from_millis(3900),
        "1 MiB under a 256 KiB/s cap went up in {took:?}"
    );
    assert!(moto.get_object(&bucket, "raw/capped.parquet").unwrap() == body);
}
