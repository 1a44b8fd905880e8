//! The body of an SQS message from the raw bucket: an S3 event notification
//! (`{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name"}, "object":
//! {"key"}}}]}`, keys URL-encoded with `+` for spaces), the `s3:TestEvent` S3 sends when the
//! notification is configured, or either of them wrapped in an SNS envelope (`"Type":
//! "Notification"`, the S3 event as a string in `"Message"`) for S3 → SNS → SQS fan-out.

use serde::Deserialize;

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The `s3:TestEvent` of a new notification configuration: nothing to do.
    Test,
    /// Objects that were created, as (bucket, decoded key); other event kinds are left out.
    Created(Vec<(String, String)>),
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "Records")]
    records: Option<Vec<Record>>,
    #[serde(rename = "Event")]
    event: Option<String>,
    #[serde(rename = "Type")]
    sns_type: Option<String>,
    #[serde(rename = "Message")]
    sns_message: Option<String>,
}

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "eventName", default)]
    event_name: String,
    s3: S3Entity,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: Bucket,
    object: Object,
}

#[derive(Deserialize)]
struct Bucket {
    name: String,
}

#[derive(Deserialize)]
struct Object {
    key: String,
}

/// Reads a message body; the error says what is wrong with it.
pub fn parse(body: &str) -> Result<Notice, String> {
    parse_at_depth(body, 0)
}

fn parse_at_depth(body: &str, depth: u8) -> Result<Notice, String> {
    let envelope: Envelope = serde_json::from_str(body)
        .map_err(|e| format!("is not an S3 event notification (not the JSON S3 sends: {e})"))?;
    if envelope.event.as_deref() == Some("s3:TestEvent") {
        return Ok(Notice::Test);
    }
    if let Some(records) = envelope.records {
        let created = records
            .into_iter()
            .filter(|r| r.event_name.starts_with("ObjectCreated:"))
            .map(|r| Ok((r.s3.bucket.name, decode_key(&r.s3.object.key)?)))
            .collect::<Result<Vec<_>, String>>()?;
        return Ok(Notice::Created(created));
    }
    if envelope.sns_type.as_deref() == Some("Notification")
        && let Some(inner) = envelope.sns_message
        && depth == 0
    {
        return parse_at_depth(&inner, 1);
    }
    Err("is JSON but neither an S3 event (`Records`), the `s3:TestEvent`, nor an SNS notification carrying one".to_owned())
}

/// S3 writes keys in events form-encoded: `%XX` escapes and `+` for a space.
fn decode_key(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = encoded
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("has the key `{encoded}` with a broken `%` escape"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("has the key `{encoded}`, which is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, key: &str) -> String {
        format!(
            r#"{{"Records":[{{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"{name}","s3":{{"bucket":{{"name":"raw-bucket"}},"object":{{"key":"{key}","size":10}}}}}}]}}"#
        )
    }

    #[test]
    fn created_objects_come_out_decoded() {
        assert_eq!(
            parse(&event(
                "ObjectCreated:Put",
                "raw%2Fgateway%3Dgw-1%2F00000000000000000001.parquet"
            ))
            .unwrap(),
            Notice::Created(vec![(
                "raw-bucket".into(),
                "raw/gateway=gw-1/00000000000000000001.parquet".into()
            )])
        );
        assert_eq!(
            parse(&event("ObjectCreated:Copy", "a+b/c")).unwrap(),
            Notice::Created(vec![("raw-bucket".into(), "a b/c".into())])
        );
        assert_eq!(
            parse(&event("ObjectRemoved:Delete", "raw/x")).unwrap(),
            Notice::Created(vec![])
        );
    }

    #[test]
    fn test_events_and_sns_envelopes_are_understood() {
        assert_eq!(
            parse(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"raw-bucket"}"#)
                .unwrap(),
            Notice::Test
        );
        let wrapped = serde_json::json!({
            "Type": "Notification",
            "TopicArn": "arn:aws:sns:eu-central-1:123456789012:raw",
            "Message": event("ObjectCreated:Put", "raw/gateway%3Dgw-2/00000000000000000005.parquet"),
        });
        assert_eq!(
            parse(&wrapped.to_string()).unwrap(),
            Notice::Created(vec![(
                "raw-bucket".into(),
                "raw/gateway=gw-2/00000000000000000005.parquet".into()
            )])
        );
    }

    #[test]
    fn anything_else_is_named_as_such() {
        assert!(
            parse("hello")
                .unwrap_err()
                .starts_with("is not an S3 event notification")
        );
        assert_eq!(
            parse(r#"{"foo": 1}"#).unwrap_err(),
            "is JSON but neither an S3 event (`Records`), the `s3:TestEvent`, nor an SNS notification carrying one"
        );
        assert_eq!(
            parse(&event("ObjectCreated:Put", "raw%2")).unwrap_err(),
            "has the key `raw%2` with a broken `%` escape"
        );
    }
}
