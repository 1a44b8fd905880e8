//! Upload targets for batches: S3 (or an S3-compatible store) and a local folder; and the
//! optional Kinesis live stream beside them.
//!
//! A target must make a `put` durable before it returns `Ok`: the buffer deletes the batch's
//! rows as soon as it does. Writing the same key twice with the same bytes must be harmless.
//! The S3 target also checks what the store acknowledged against what it sent (checksums,
//! ETags), uploads large batches in parts and keeps to the optional bandwidth cap (`pace`);
//! see its module docs.

mod dir;
pub mod kinesis;
mod pace;
mod s3;

pub use dir::DirSink;
pub use s3::S3Sink;

use aws_sdk_s3::config::SharedHttpClient;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use bytes::Bytes;

use crate::config::UploadConfig;

/// Problems reaching an upload target. All of them are retried by the batcher.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("upload of {key} to {target} failed: {message}")]
    Put {
        target: String,
        key: String,
        message: String,
    },
    #[error("upload target is not configured: set exactly one of [upload.s3] or [upload.dir]")]
    NotConfigured,
}

/// The HTTPS client of the S3 and Kinesis clients: the SDK's own hyper and rustls stack on the
/// ring crypto provider, with the system's root certificates (the SDK's default would link the
/// much larger aws-lc library).
pub(crate) fn aws_https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// The configured upload target.
pub enum BatchSink {
    S3(S3Sink),
    Dir(DirSink),
}

impl BatchSink {
    pub async fn from_config(config: &UploadConfig) -> Result<Self, SinkError> {
        match (&config.s3, &config.dir) {
            (Some(s3), None) => Ok(Self::S3(S3Sink::new(s3).await)),
            (None, Some(dir)) => Ok(Self::Dir(DirSink::new(dir))),
            _ => Err(SinkError::NotConfigured),
        }
    }

    /// Where batches go, for logs (`s3://bucket/prefix` or a folder).
    pub fn describe(&self) -> String {
        match self {
            Self::S3(s) => s.describe(),
            Self::Dir(d) => d.describe(),
        }
    }

    /// The key prefix of the raw zone.
    pub fn prefix(&self) -> &str {
        match self {
            Self::S3(s) => s.prefix(),
            Self::Dir(d) => d.prefix(),
        }
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        match self {
            Self::S3(s) => s.put(key, body).await,
            Self::Dir(d) => d.put(key, body).await,
        }
    }
}
