use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::SinkError;
use crate::config::S3Upload;

/// An S3 bucket, on AWS or an S3-compatible endpoint.
pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Sink {
    /// Builds the client. Credentials come from the AWS default chain (environment, shared
    /// profile, web identity, container or instance role); they are looked up at the first
    /// request, so a gateway that boots before its network is up still starts.
    pub async fn new(config: &S3Upload) -> Self {
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(config.timeout.0)
            .connect_timeout(std::time::Duration::from_secs(10))
            .build();
        let shared = aws_config::defaults(BehaviorVersion::latest())
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
        }
    }

    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/vnd.apache.parquet")
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SinkError::Put {
                target: self.describe(),
                key: key.to_owned(),
                message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
            })
    }
}
