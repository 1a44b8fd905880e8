//! `PUT` into internal stages of AWS-hosted accounts: the collector encrypts the file the way
//! Snowflake's connectors do and uploads it with the `PUT` answer's temporary credentials. A real
//! S3 (moto) receives it; boto3 downloads it and the official Python connector's own decryption
//! (`SnowflakeEncryptionUtil.decrypt_stream`) must give back the original Parquet bytes, whose
//! SHA-256 must match the `sfc-digest` the collector set.

use std::process::Command;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use collector::snowflake::{
    EncryptionMaterial, SnowflakeError, StageUploadError, UploadTarget, upload_to_s3_stage,
};
use pipeline_e2e::{MotoServer, PeerVenv, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY};
use serde_json::{Value, json};

/// Downloads the object with boto3 and decrypts it with the connector's own code when it carries
/// the encryption metadata; prints the plaintext, the metadata and the plaintext's digest.
const DOWNLOAD_AND_DECRYPT: &str = r#"
import base64, hashlib, io, json, sys
import boto3
from snowflake.connector.constants import EncryptionMetadata
from snowflake.connector.encryption_util import SnowflakeEncryptionUtil
from snowflake.connector.storage_client import SnowflakeFileEncryptionMaterial

endpoint, bucket, key, master_key = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="x", aws_secret_access_key="x")
obj = s3.get_object(Bucket=bucket, Key=key)
body = obj["Body"].read()
meta = obj["Metadata"]
if "x-amz-key" in meta:
    matdesc = json.loads(meta["x-amz-matdesc"])
    material = SnowflakeFileEncryptionMaterial(
        query_stage_master_key=master_key,
        query_id=matdesc["queryId"],
        smk_id=int(matdesc["smkId"]),
    )
    out = io.BytesIO()
    SnowflakeEncryptionUtil.decrypt_stream(
        EncryptionMetadata(key=meta["x-amz-key"], iv=meta["x-amz-iv"], matdesc=meta["x-amz-matdesc"]),
        material, io.BytesIO(body), out)
    plain = out.getvalue()
else:
    plain = body
print(json.dumps({
    "stored_len": len(body),
    "plaintext": base64.b64encode(plain).decode(),
    "plaintext_digest": base64.b64encode(hashlib.sha256(plain).digest()).decode(),
    "metadata": meta,
}))
"#;

/// A Parquet file big enough to span several of the connector's 64 KiB decryption chunks.
fn parquet_bytes() -> Vec<u8> {
    let n = 20_000i64;
    let seq: ArrayRef =
        Arc::new(Int64Array::from_iter_values((0..n).map(|i| {
            i.wrapping_mul(0x9E37_79B9_7F4A_7C15_u64.cast_signed())
        })));
    let gateway: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..n).map(|i| format!("gw-{}", i % 97)),
    ));
    let batch = RecordBatch::try_from_iter([("SEQ", seq), ("GATEWAY", gateway)]).unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    assert!(out.len() > 3 * 64 * 1024, "{} bytes", out.len());
    out
}

/// The `stageInfo` of a `PUT` answer as an AWS-hosted account sends it, pointed at moto.
fn stage_info(moto: &MotoServer, bucket: &str) -> UploadTarget {
    serde_json::from_value(json!({
        "locationType": "S3",
        "location": format!("{bucket}/tmp/x7Yq/stages/0f3c/"),
        "path": "tmp/x7Yq/stages/0f3c/",
        "region": S3_REGION,
        "storageAccount": null,
        "isClientSideEncrypted": true,
        "creds": {
            "AWS_KEY_ID": S3_ACCESS_KEY_ID,
            "AWS_SECRET_KEY": S3_SECRET_ACCESS_KEY,
            "AWS_TOKEN": "session-token-from-snowflake"
        },
        "presignedUrl": null,
        "endPoint": moto.endpoint(),
        "useS3RegionalUrl": false
    }))
    .expect("a stageInfo as Snowflake sends it parses")
}

fn master_key(bits: usize) -> String {
    let key: Vec<u8> = (0..bits / 8)
        .map(|i| u8::try_from(i * 37 % 251).unwrap())
        .collect();
    B64.encode(key)
}

fn material(master_key: &str) -> EncryptionMaterial {
    EncryptionMaterial::from_answer(&json!({
        "queryStageMasterKey": master_key,
        "queryId": "01b8e6f2-0000-4a1b-0000-00012a3b4c5d",
        "smkId": 2_961_847_u64
    }))
    .expect("encryptionMaterial as Snowflake sends it parses")
    .expect("the material is not null")
}

fn download_and_decrypt(moto: &MotoServer, bucket: &str, key: &str, master_key: &str) -> Value {
    let venv = PeerVenv::peers();
    let output = Command::new(venv.python())
        .args([
            "-c",
            DOWNLOAD_AND_DECRYPT,
            &moto.endpoint(),
            bucket,
            key,
            master_key,
        ])
        .output()
        .expect("run the peers venv's python (tests/run.sh installs it)");
    assert!(
        output.status.success(),
        "download and decrypt failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn upload_encrypted_and_decrypt_with_the_connector(bits: usize) {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let mut target = stage_info(&moto, &bucket);
    let key = master_key(bits);
    target.encryption = Some(material(&key));
    let plain = parquet_bytes();

    upload_to_s3_stage(&target, "part-00000-abc.parquet", plain.clone())
        .await
        .unwrap();

    let got = download_and_decrypt(
        &moto,
        &bucket,
        "tmp/x7Yq/stages/0f3c/part-00000-abc.parquet",
        &key,
    );
    let decrypted = B64.decode(got["plaintext"].as_str().unwrap()).unwrap();
    assert!(
        decrypted == plain,
        "the connector's decryption gave {} bytes, not the {} uploaded",
        decrypted.len(),
        plain.len()
    );
    assert_eq!(
        got["stored_len"],
        // PKCS#7 always pads, a whole block when the length is a multiple of it
        json!((plain.len() / 16 + 1) * 16),
        "S3 holds the ciphertext, not the plaintext"
    );
    assert_eq!(got["metadata"]["sfc-digest"], got["plaintext_digest"]);
    let matdesc: Value =
        serde_json::from_str(got["metadata"]["x-amz-matdesc"].as_str().unwrap()).unwrap();
    assert_eq!(
        matdesc,
        json!({
            "queryId": "01b8e6f2-0000-4a1b-0000-00012a3b4c5d",
            "smkId": "2961847",
            "keySize": bits.to_string()
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_encrypted_with_a_256_bit_stage_key_decrypts_with_the_python_connector() {
    upload_encrypted_and_decrypt_with_the_connector(256).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_encrypted_with_a_128_bit_stage_key_decrypts_with_the_python_connector() {
    upload_encrypted_and_decrypt_with_the_connector(128).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_without_encryption_material_gets_the_plain_file_and_its_digest() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let target = stage_info(&moto, &bucket);
    let plain = parquet_bytes();

    upload_to_s3_stage(&target, "plain.parquet", plain.clone())
        .await
        .unwrap();

    let stored = moto
        .get_object(&bucket, "tmp/x7Yq/stages/0f3c/plain.parquet")
        .expect("the file is in the stage's prefix");
    assert!(stored == plain, "the stored object differs from the file");
    let got = download_and_decrypt(&moto, &bucket, "tmp/x7Yq/stages/0f3c/plain.parquet", "");
    assert_eq!(got["metadata"]["sfc-digest"], got["plaintext_digest"]);
    assert!(got["metadata"].get("x-amz-key").is_none(), "{got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_to_a_missing_bucket_names_the_bucket_and_key() {
    let moto = MotoServer::start();
    let target = stage_info(&moto, "sfc-no-such-bucket");

    let err = upload_to_s3_stage(&target, "f.parquet", b"PAR1".to_vec())
        .await
        .unwrap_err();

    assert!(matches!(err, StageUploadError::Store { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("s3://sfc-no-such-bucket/tmp/x7Yq/stages/0f3c/f.parquet"),
        "{shown}"
    );
    assert!(!shown.contains(S3_SECRET_ACCESS_KEY), "{shown}");
    // the client's error wraps it with the file name, and it is not retried as transient
    let wrapped = SnowflakeError::StageUpload {
        file: "f.parquet".into(),
        source: Box::new(err),
    };
    assert!(!wrapped.is_transient());
}
