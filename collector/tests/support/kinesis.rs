//! A Kinesis client for the kinesalite peer and a stream on it. Included with `#[path]` by the
//! test files that need them.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};

pub(crate) fn client(endpoint: &str) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

/// A stream of `shards` shards, ACTIVE.
pub(crate) async fn create_stream(client: &Client, shards: i32) -> String {
    let name = format!("live-{}", uuid::Uuid::new_v4().simple());
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    for _ in 0..200 {
        let summary = client
            .describe_stream_summary()
            .stream_name(&name)
            .send()
            .await
            .unwrap();
        let status = summary
            .stream_description_summary()
            .map(|s| s.stream_status().as_str().to_owned());
        if status.as_deref() == Some("ACTIVE") {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("stream {name} never became ACTIVE");
}
