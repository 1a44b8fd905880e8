//! The S3 upload target: one PUT per batch up to `multipart_threshold`, a multipart upload
//! above it, each request with a CRC32C the store checks, and the store's answer checked in
//! turn.
//!
//! # What holds
//! - A batch is confirmed (`put` returns `Ok`) only when the store acknowledged every byte and
//!   the acknowledgement matches what was sent:
//!   - every request carries `x-amz-checksum-crc32c` of its body; S3 refuses a body that does
//!     not match (`BadDigest`), and a checksum echoed in the answer must equal ours;
//!   - without SSE-KMS, the ETag S3 returns is the MD5 of the bytes it stored (for a multipart
//!     upload, the MD5 of the parts' MD5s and `-<parts>`); a different ETag means the bytes were
//!     changed on the way, and the object is deleted again and the batch retried. SSE-KMS
//!     ETags are not MD5s (whether `sse` asked for it or the bucket's default encryption applied
//!     it, as the answer says), so there the CRC32C alone guards the bytes.
//! - A multipart upload that fails is aborted, so no orphan parts are billed; parts a crash
//!   left behind are aborted before the same key is uploaded again. A lifecycle rule for
//!   incomplete multipart uploads (see the README) is the backstop for anything both miss.
//! - The object key and bytes come from the caller and are sent unchanged: a retry writes the
//!   same key with the same bytes, in one PUT or in the same parts.
//! - With `max_bytes_per_second`, request bodies go no faster than the cap (see
//!   [`super::pace`]) and each request's timeout grows by the time the cap needs for it.

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use aws_smithy_checksums::ChecksumAlgorithm as Algorithm;
use bytes::Bytes;
use tracing::{info, warn};

use super::SinkError;
use super::pace::{Pace, PacedBody};
use crate::config::S3Upload;

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/vnd.apache.parquet";

/// An S3 bucket, on AWS or an S3-compatible endpoint.
pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    timeout: Duration,
    multipart_threshold: u64,
    part_size: u64,
    storage_class: Option<StorageClass>,
    sse: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
    pace: Option<Arc<Pace>>,
}

impl S3Sink {
    /// Builds the client. Credentials come from the AWS default chain (environment, shared
    /// profile, web identity, container or instance role); they are looked up at the first
    /// request, so a gateway that boots before its network is up still starts.
    pub async fn new(config: &S3Upload) -> Self {
        Self::with_loader(config, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// Like [`S3Sink::new`] with fixed credentials instead of the default chain (tests and
    /// tools that hold a key pair themselves).
    pub async fn with_static_credentials(
        config: &S3Upload,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Self {
        let credentials = aws_sdk_s3::config::Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "plantline-static",
        );
        Self::with_loader(
            config,
            aws_config::defaults(BehaviorVersion::latest()).credentials_provider(credentials),
        )
        .await
    }

    async fn with_loader(config: &S3Upload, loader: aws_config::ConfigLoader) -> Self {
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(config.timeout.0)
            .connect_timeout(CONNECT_TIMEOUT)
            .build();
        let shared = loader
            .http_client(super::aws_https_client())
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(timeouts)
            .load()
            .await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let path_style = config.force_path_style.unwrap_or(config.endpoint.is_some());
        builder = builder.force_path_style(path_style);
        Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            timeout: config.timeout.0,
            multipart_threshold: config.multipart_threshold.0,
            part_size: config.part_size.0,
            // `validate` admits only names the SDK knows; an unknown one would still be sent.
            storage_class: config.storage_class.as_deref().map(StorageClass::from),
            sse: config.sse.as_deref().map(ServerSideEncryption::from),
            kms_key_id: config.kms_key_id.clone(),
            pace: config
                .max_bytes_per_second
                .map(|rate| Arc::new(Pace::new(rate.0))),
        }
    }

    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Uploads `body` under `key` and returns once the store confirmed exactly these bytes.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        if body.len() as u64 > self.multipart_threshold {
            self.put_multipart(key, body).await
        } else {
            self.put_single(key, body).await
        }
    }

    async fn put_single(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        let sums = Sums::of(&body);
        let len = body.len();
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(CONTENT_TYPE)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .checksum_crc32_c(&sums.crc32c)
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key_id.clone())
            .body(self.body(body))
            .customize()
            .config_override(self.timeouts_for(len))
            .send()
            .await
            .map_err(|e| self.error(key, "PUT", &e))?;
        let checked = self
            .check_crc(key, "PUT", out.checksum_crc32_c(), &sums.crc32c)
            .and_then(|()| {
                self.check_etag(
                    key,
                    "PUT",
                    out.e_tag(),
                    out.server_side_encryption(),
                    &sums.md5_hex(),
                )
            });
        if let Err(e) = checked {
            self.delete_bad_object(key).await;
            return Err(e);
        }
        Ok(())
    }

    async fn put_multipart(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        self.abort_leftover_uploads(key).await;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(CONTENT_TYPE)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key_id.clone())
            .send()
            .await
            .map_err(|e| self.error(key, "CreateMultipartUpload", &e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(self.refused(
                key,
                "CreateMultipartUpload",
                "the answer carried no upload id",
            ));
        };
        let parts = part_ranges(body.len() as u64, self.part_size);
        info!(
            component = "batcher",
            key,
            bytes = body.len(),
            parts = parts.len(),
            "multipart upload started"
        );
        match self.send_parts(key, &upload_id, &body, &parts).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.abort(key, &upload_id).await;
                Err(e)
            }
        }
    }

    /// Sends the parts one after the other (a gateway's uplink gains nothing from parallel
    /// parts) and completes the upload. The caller aborts it on any error.
    async fn send_parts(
        &self,
        key: &str,
        upload_id: &str,
        body: &Bytes,
        parts: &[(usize, usize)],
    ) -> Result<(), SinkError> {
        let mut completed = Vec::with_capacity(parts.len());
        let mut part_sums = Vec::with_capacity(parts.len());
        for (i, &(start, end)) in parts.iter().enumerate() {
            let number = i32::try_from(i + 1).expect("at most 10 000 parts, see part_ranges");
            let chunk = body.slice(start..end);
            let sums = Sums::of(&chunk);
            let what = format!("UploadPart {number} of {}", parts.len());
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(i64::try_from(end - start).unwrap_or(i64::MAX))
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .checksum_crc32_c(&sums.crc32c)
                .body(self.body(chunk))
                .customize()
                .config_override(self.timeouts_for(end - start))
                .send()
                .await
                .map_err(|e| self.error(key, &what, &e))?;
            self.check_crc(key, &what, out.checksum_crc32_c(), &sums.crc32c)?;
            self.check_etag(
                key,
                &what,
                out.e_tag(),
                out.server_side_encryption(),
                &sums.md5_hex(),
            )?;
            let etag = out
                .e_tag()
                .ok_or_else(|| self.refused(key, &what, "the answer carried no ETag"))?;
            completed.push(
                CompletedPart::builder()
                    .part_number(number)
                    .e_tag(etag)
                    .checksum_crc32_c(&sums.crc32c)
                    .build(),
            );
            part_sums.push(sums);
        }
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.error(key, "CompleteMultipartUpload", &e))?;
        let expected = Composite::of(&part_sums);
        let checked = self
            .check_composite_crc(key, out.checksum_crc32_c(), &expected)
            .and_then(|()| {
                self.check_etag(
                    key,
                    "CompleteMultipartUpload",
                    out.e_tag(),
                    out.server_side_encryption(),
                    &expected.etag,
                )
            });
        if let Err(e) = checked {
            self.delete_bad_object(key).await;
            return Err(e);
        }
        Ok(())
    }

    /// Aborts the unfinished multipart uploads of `key` (what a crash in the middle of one
    /// left behind), so their parts stop being billed. Only this gateway writes its keys, so an
    /// unfinished upload of one is never someone else's. Failures are logged, not fatal: the
    /// lifecycle rule is the backstop.
    async fn abort_leftover_uploads(&self, key: &str) {
        let listed = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .await;
        match listed {
            Ok(list) => {
                for upload in list.uploads() {
                    if let (Some(k), Some(id)) = (upload.key(), upload.upload_id())
                        && k == key
                    {
                        info!(
                            component = "batcher",
                            key,
                            upload_id = id,
                            "aborting an unfinished multipart upload left by an earlier attempt"
                        );
                        self.abort(key, id).await;
                    }
                }
            }
            Err(e) => warn!(
                component = "batcher",
                key,
                "cannot list unfinished multipart uploads (is s3:ListBucketMultipartUploads allowed?); a lifecycle rule must remove their parts: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
        }
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            warn!(
                component = "batcher",
                key,
                upload_id,
                "cannot abort the multipart upload; its parts are billed until the next attempt or a lifecycle rule removes them: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            );
        }
    }

    /// Removes an object whose stored bytes differ from the batch, so a reader does not take
    /// it for the batch before the retry overwrites it.
    async fn delete_bad_object(&self, key: &str) {
        if let Err(e) = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            warn!(
                component = "batcher",
                key,
                "cannot delete the object whose bytes differ from the batch; the retry overwrites it: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            );
        }
    }

    fn body(&self, data: Bytes) -> ByteStream {
        match &self.pace {
            None => ByteStream::from(data),
            Some(pace) => {
                let pace = Arc::clone(pace);
                // Retryable: the SDK's own retries send the same bytes again, on the schedule.
                ByteStream::new(SdkBody::retryable(move || {
                    SdkBody::from_body_1_x(PacedBody::new(data.clone(), Arc::clone(&pace)))
                }))
            }
        }
    }

    /// The timeouts of one request with `bytes` of body: the configured time, plus what the
    /// bandwidth cap needs for the bytes.
    fn timeouts_for(&self, bytes: usize) -> aws_sdk_s3::config::Builder {
        let extra = self
            .pace
            .as_ref()
            .map_or(Duration::ZERO, |p| p.time_for(bytes));
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(self.timeout + extra)
                .connect_timeout(CONNECT_TIMEOUT)
                .build(),
        )
    }

    fn check_crc(
        &self,
        key: &str,
        what: &str,
        answered: Option<&str>,
        sent: &str,
    ) -> Result<(), SinkError> {
        match answered {
            Some(answered) if answered != sent => Err(self.refused(
                key,
                what,
                &format!("the store answered CRC32C {answered}, the batch has {sent}"),
            )),
            _ => Ok(()),
        }
    }

    fn check_composite_crc(
        &self,
        key: &str,
        answered: Option<&str>,
        expected: &Composite,
    ) -> Result<(), SinkError> {
        let Some(answered) = answered else {
            return Ok(());
        };
        let (sum, parts) = answered.split_once('-').unwrap_or((answered, ""));
        if sum == expected.crc32c && (parts.is_empty() || parts == expected.parts.to_string()) {
            Ok(())
        } else {
            Err(self.refused(
                key,
                "CompleteMultipartUpload",
                &format!(
                    "the store answered CRC32C {answered}, the parts give {}-{}",
                    expected.crc32c, expected.parts
                ),
            ))
        }
    }

    /// Compares the ETag with the MD5 of what was sent, where the ETag is one: not when the
    /// object is encrypted with KMS, asked for by `sse` or applied by the bucket's default
    /// encryption (the answer says which).
    fn check_etag(
        &self,
        key: &str,
        what: &str,
        etag: Option<&str>,
        applied: Option<&ServerSideEncryption>,
        expected: &str,
    ) -> Result<(), SinkError> {
        let kms = |sse: Option<&ServerSideEncryption>| {
            matches!(
                sse,
                Some(ServerSideEncryption::AwsKms | ServerSideEncryption::AwsKmsDsse)
            )
        };
        if kms(self.sse.as_ref()) || kms(applied) {
            return Ok(());
        }
        match etag.map(|e| e.trim_matches('"')) {
            Some(etag) if !etag.eq_ignore_ascii_case(expected) => Err(self.refused(
                key,
                what,
                &format!(
                    "the stored bytes differ from the batch (ETag {etag}, the MD5 of what was sent is {expected}); the bytes were changed on the way"
                ),
            )),
            _ => Ok(()),
        }
    }

    fn error<E>(&self, key: &str, what: &str, e: &E) -> SinkError
    where
        E: std::error::Error + 'static,
    {
        SinkError::Put {
            target: self.describe(),
            key: key.to_owned(),
            message: format!("{what}: {}", aws_sdk_s3::error::DisplayErrorContext(e)),
        }
    }

    fn refused(&self, key: &str, what: &str, message: &str) -> SinkError {
        SinkError::Put {
            target: self.describe(),
            key: key.to_owned(),
            message: format!("{what}: {message}"),
        }
    }
}

/// The byte ranges of the parts of a `len`-byte upload: `part_size` each (the last one
/// smaller), or larger parts when `part_size` would need more than S3's 10 000.
fn part_ranges(len: u64, part_size: u64) -> Vec<(usize, usize)> {
    let size = part_size.max(len.div_ceil(MAX_PARTS)).max(1);
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < len {
        let end = (start + size).min(len);
        ranges.push((
            usize::try_from(start).expect("a body in memory fits in usize"),
            usize::try_from(end).expect("a body in memory fits in usize"),
        ));
        start = end;
    }
    ranges
}

/// The checksums of one request body.
struct Sums {
    /// Base64 of the big-endian CRC32C, as S3 writes it.
    crc32c: String,
    crc32c_raw: Bytes,
    md5: Bytes,
}

impl Sums {
    fn of(data: &[u8]) -> Self {
        let crc32c_raw = digest(Algorithm::Crc32c, data);
        Self {
            crc32c: base64(&crc32c_raw),
            crc32c_raw,
            md5: md5(data),
        }
    }

    fn md5_hex(&self) -> String {
        hex(&self.md5)
    }
}

/// What the store gives a completed multipart upload: the composite CRC32C (the CRC32C of the
/// parts' CRC32Cs, with the part count) and the ETag (the MD5 of the parts' MD5s).
struct Composite {
    crc32c: String,
    parts: usize,
    etag: String,
}

impl Composite {
    fn of(parts: &[Sums]) -> Self {
        let crcs: Vec<u8> = parts.iter().flat_map(|s| s.crc32c_raw.to_vec()).collect();
        let md5s: Vec<u8> = parts.iter().flat_map(|s| s.md5.to_vec()).collect();
        let etag = hex(&md5(&md5s));
        Self {
            crc32c: base64(&digest(Algorithm::Crc32c, &crcs)),
            parts: parts.len(),
            etag: format!("{etag}-{}", parts.len()),
        }
    }
}

fn digest(algorithm: Algorithm, data: &[u8]) -> Bytes {
    let mut checksum = algorithm.into_impl();
    checksum.update(data);
    checksum.finalize()
}

/// MD5 is what S3 uses for ETags, not a choice of ours.
fn md5(data: &[u8]) -> Bytes {
    use md5::Digest as _;
    Bytes::copy_from_slice(&md5::Md5::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Standard base64 with padding (RFC 4648), as S3 writes checksums.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_part_size_with_a_smaller_last_one_and_never_more_than_s3_allows() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            part_ranges(20 * MIB + 5, 8 * MIB),
            [
                (0, 8 << 20),
                (8 << 20, 16 << 20),
                (16 << 20, (20 << 20) + 5)
            ]
        );
        assert_eq!(part_ranges(8 * MIB, 8 * MIB), [(0, 8 << 20)]);
        // A 100,000 MiB body cannot be in memory on a 32-bit gateway (armv7).
        #[cfg(target_pointer_width = "64")]
        {
            let huge = part_ranges(100_000 * MIB, 5 * MIB);
            assert_eq!(huge.len(), 10_000);
            assert_eq!(huge[0], (0, 10 << 20));
        }
    }

    #[test]
    fn checksums_are_written_as_s3_writes_them() {
        // CRC32C("123456789") = 0xE3069283 (the standard check value).
        let sums = Sums::of(b"123456789");
        assert_eq!(sums.crc32c, base64(&[0xE3, 0x06, 0x92, 0x83]));
        assert_eq!(sums.crc32c, "4waSgw==");
        assert_eq!(Sums::of(b"").md5_hex(), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn a_composite_checksum_is_over_the_parts_sums() {
        let parts = [Sums::of(b"abc"), Sums::of(b"def")];
        let composite = Composite::of(&parts);
        let mut crcs = parts[0].crc32c_raw.to_vec();
        crcs.extend_from_slice(&parts[1].crc32c_raw);
        assert_eq!(composite.crc32c, Sums::of(&crcs).crc32c);
        assert_eq!(composite.parts, 2);
        assert!(composite.etag.ends_with("-2"));
        assert_ne!(composite.crc32c, Sums::of(b"abcdef").crc32c);
    }
}
