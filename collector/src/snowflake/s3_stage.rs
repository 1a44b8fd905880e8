//! `PUT` into internal stages of AWS-hosted accounts: Snowflake answers the `PUT` with a bucket,
//! temporary AWS credentials and (for `SNOWFLAKE_FULL` stages) a query stage master key, and the
//! client encrypts and uploads the file itself, as the official connectors do.
//!
//! # Invariants
//! - Client-side encryption is the connectors' scheme, so Snowflake can read what we upload: a
//!   fresh random file key the size of the master key and a fresh random 16-byte IV per file;
//!   the file under AES-CBC with PKCS#7 padding and the file key; the file key (PKCS#7-padded)
//!   under AES-ECB with the master key. The wrapped key, the IV and the material descriptor
//!   travel as object metadata (`x-amz-meta-x-amz-key`, `-x-amz-iv`, `-x-amz-matdesc`).
//! - `x-amz-meta-sfc-digest` is the base64 SHA-256 of the plaintext, encrypted or not.
//! - The temporary credentials and the master key never appear in logs, errors or `Debug`.

use std::fmt;
use std::time::Duration;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockCipherEncrypt, BlockModeEncrypt, KeyInit, KeyIvInit};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use object_store::aws::AmazonS3Builder;
use object_store::{Attribute, Attributes, ObjectStore, PutOptions, PutPayload, RetryConfig};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::client::UploadTarget;

/// AES's block size, which is also the IV's size.
const BLOCK: usize = 16;
/// Region for stages whose answer names none (Snowflake always does for S3; tests may not).
const DEFAULT_REGION: &str = "us-east-1";

/// Why an upload to an S3 stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageUploadError {
    #[error(
        "the PUT answer's encryptionMaterial.queryStageMasterKey is not a base64 AES-128 or AES-256 key ({detail}); Snowflake sent something this collector does not understand"
    )]
    MasterKey { detail: String },
    #[error("the PUT answer's stageInfo.location `{location}` names no bucket")]
    Location { location: String },
    #[error("the random number source failed while encrypting for the stage: {detail}")]
    Random { detail: String },
    #[error(
        "S3 refused or failed the upload to s3://{bucket}/{key} (region {region}): {source}; the PUT's temporary credentials may have expired or the network may block S3"
    )]
    Store {
        bucket: String,
        key: String,
        region: String,
        // boxed: object_store's errors are large and this one is rare
        #[source]
        source: Box<object_store::Error>,
    },
}

/// Temporary AWS credentials that a `PUT` answer grants (`stageInfo.creds`). Only the key id is
/// shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StageCredentials {
    #[serde(rename = "AWS_KEY_ID", default)]
    key_id: Option<String>,
    #[serde(rename = "AWS_SECRET_KEY", default)]
    secret_key: Option<String>,
    #[serde(rename = "AWS_TOKEN", default)]
    token: Option<String>,
}

impl fmt::Debug for StageCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("StageCredentials")
            .field("key_id", &self.key_id)
            .field("secret_key", &redacted(&self.secret_key))
            .field("token", &redacted(&self.token))
            .finish()
    }
}

/// The stage's client-side encryption key for one `PUT` (`data.encryptionMaterial`). `Debug`
/// never shows the master key.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionMaterial {
    query_stage_master_key: String,
    #[serde(default, deserialize_with = "text_or_number")]
    query_id: String,
    // Snowflake sends a number; the material descriptor carries it as a string
    #[serde(deserialize_with = "text_or_number")]
    smk_id: String,
}

impl fmt::Debug for EncryptionMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionMaterial")
            .field("query_stage_master_key", &"<redacted>")
            .field("query_id", &self.query_id)
            .field("smk_id", &self.smk_id)
            .finish()
    }
}

impl EncryptionMaterial {
    /// Reads `data.encryptionMaterial` of a query answer: `null` or absent for stages without
    /// client-side encryption, an object for a `PUT`, a list (one per file) for a `GET`.
    pub fn from_answer(value: &Value) -> Result<Option<Self>, serde_json::Error> {
        match value {
            Value::Null => Ok(None),
            Value::Array(items) => items
                .iter()
                .find(|v| !v.is_null())
                .map(Self::deserialize)
                .transpose(),
            other => Self::deserialize(other).map(Some),
        }
    }
}

fn text_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Null => Ok(String::new()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or a number, found {other}"
        ))),
    }
}

/// A file encrypted for a stage, with the object metadata Snowflake needs to decrypt it.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptedFile {
    /// The ciphertext.
    pub bytes: Vec<u8>,
    /// `x-amz-key`: the file key wrapped with the master key, base64.
    pub wrapped_key: String,
    /// `x-amz-iv`: the IV, base64.
    pub iv: String,
    /// `x-amz-matdesc`: `{"queryId":...,"smkId":...,"keySize":...}`.
    pub matdesc: String,
}

impl fmt::Debug for EncryptedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedFile")
            .field("bytes", &self.bytes.len())
            .field("matdesc", &self.matdesc)
            .finish_non_exhaustive()
    }
}

/// Encrypts `plaintext` the way Snowflake's connectors do for a stage with `material`.
pub fn encrypt_for_stage(
    material: &EncryptionMaterial,
    plaintext: &[u8],
) -> Result<EncryptedFile, StageUploadError> {
    let master = B64
        .decode(material.query_stage_master_key.trim())
        .map_err(|e| StageUploadError::MasterKey {
            detail: format!("not base64: {e}"),
        })?;
    if master.len() != 16 && master.len() != 32 {
        return Err(StageUploadError::MasterKey {
            detail: format!("{} bits", master.len() * 8),
        });
    }
    let mut file_key = vec![0u8; master.len()];
    let mut iv = [0u8; BLOCK];
    getrandom::fill(&mut file_key)
        .and_then(|()| getrandom::fill(&mut iv))
        .map_err(|e| StageUploadError::Random {
            detail: e.to_string(),
        })?;
    let bytes = cbc_encrypt(&file_key, &iv, plaintext);
    let wrapped = ecb_wrap(&master, &file_key);
    // the connectors write the descriptor compactly, with every value a string
    let quoted = |s: &str| Value::String(s.to_owned()).to_string();
    let matdesc = format!(
        r#"{{"queryId":{},"smkId":{},"keySize":"{}"}}"#,
        quoted(&material.query_id),
        quoted(&material.smk_id),
        master.len() * 8
    );
    Ok(EncryptedFile {
        bytes,
        wrapped_key: B64.encode(wrapped),
        iv: B64.encode(iv),
        matdesc,
    })
}

/// AES-CBC with PKCS#7 padding; `key` is 16 or 32 bytes (checked by the caller).
fn cbc_encrypt(key: &[u8], iv: &[u8; BLOCK], data: &[u8]) -> Vec<u8> {
    const WHY: &str = "key and IV lengths are checked before";
    if key.len() == 16 {
        cbc::Encryptor::<aes::Aes128>::new_from_slices(key, iv)
            .expect(WHY)
            .encrypt_padded_vec::<Pkcs7>(data)
    } else {
        cbc::Encryptor::<aes::Aes256>::new_from_slices(key, iv)
            .expect(WHY)
            .encrypt_padded_vec::<Pkcs7>(data)
    }
}

/// The file key PKCS#7-padded (a whole extra block, as its length is a multiple of the block
/// size) and encrypted block by block (ECB) under the master key, as the connectors wrap it.
fn ecb_wrap(master: &[u8], file_key: &[u8]) -> Vec<u8> {
    const WHY: &str = "the master key's length is checked before";
    let mut padded = file_key.to_vec();
    padded.extend([u8::try_from(BLOCK).expect("16 fits a byte"); BLOCK]);
    let mut blocks: Vec<aes::Block> = padded
        .chunks_exact(BLOCK)
        .map(|c| aes::Block::try_from(c).expect("chunks_exact yields whole blocks"))
        .collect();
    if master.len() == 16 {
        aes::Aes128::new_from_slice(master)
            .expect(WHY)
            .encrypt_blocks(&mut blocks);
    } else {
        aes::Aes256::new_from_slice(master)
            .expect(WHY)
            .encrypt_blocks(&mut blocks);
    }
    blocks.iter().flat_map(|b| b.iter().copied()).collect()
}

/// The bucket and the object key for `file_name` in a stage at `location` (`bucket/prefix/`).
fn object_location(location: &str, file_name: &str) -> Option<(String, String)> {
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    if bucket.is_empty() {
        return None;
    }
    let prefix = prefix.trim_start_matches('/');
    let key = if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{file_name}")
    } else {
        format!("{prefix}/{file_name}")
    };
    Some((bucket.to_owned(), key))
}

/// Uploads `bytes` as `file_name` into the S3 stage a `PUT` answer described, encrypted when
/// the answer carried encryption material.
///
/// `stageInfo.endPoint` is a host name on real accounts (a FIPS or `PrivateLink` endpoint); a
/// full `http://` or `https://` URL there is used as is, path-style, which is how tests point
/// the upload at a local S3.
pub async fn upload_to_s3_stage(
    target: &UploadTarget,
    file_name: &str,
    bytes: Vec<u8>,
) -> Result<(), StageUploadError> {
    let (bucket, key) =
        object_location(&target.location, file_name).ok_or_else(|| StageUploadError::Location {
            location: target.location.clone(),
        })?;
    let region = target
        .region
        .clone()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_REGION.to_owned());
    let digest = B64.encode(Sha256::digest(&bytes));
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::Metadata("sfc-digest".into()), digest.into());
    let body = match &target.encryption {
        Some(material) => {
            let encrypted = encrypt_for_stage(material, &bytes)?;
            attributes.insert(
                Attribute::Metadata("x-amz-key".into()),
                encrypted.wrapped_key.into(),
            );
            attributes.insert(Attribute::Metadata("x-amz-iv".into()), encrypted.iv.into());
            attributes.insert(
                Attribute::Metadata("x-amz-matdesc".into()),
                encrypted.matdesc.into(),
            );
            encrypted.bytes
        }
        None => bytes,
    };

    let creds = &target.creds;
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region(&region)
        // the client's PUT loop retries too; keep a dead endpoint from stalling a load for minutes
        .with_retry(RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_mins(1),
            ..RetryConfig::default()
        });
    if let Some(id) = &creds.key_id {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = &creds.secret_key {
        builder = builder.with_secret_access_key(secret);
    }
    if let Some(token) = creds.token.as_ref().filter(|t| !t.is_empty()) {
        builder = builder.with_token(token);
    }
    match target.end_point.as_deref().filter(|e| !e.is_empty()) {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            builder = builder
                .with_endpoint(url)
                .with_allow_http(url.starts_with("http://"));
        }
        Some(host) => {
            builder = builder
                .with_endpoint(format!("https://{bucket}.{host}"))
                .with_virtual_hosted_style_request(true);
        }
        None if region.starts_with("cn-") => {
            builder = builder
                .with_endpoint(format!("https://{bucket}.s3.{region}.amazonaws.com.cn"))
                .with_virtual_hosted_style_request(true);
        }
        None if target.use_s3_regional_url => {
            builder = builder
                .with_endpoint(format!("https://{bucket}.s3.{region}.amazonaws.com"))
                .with_virtual_hosted_style_request(true);
        }
        None => {}
    }
    let store_err = |source| StageUploadError::Store {
        bucket: bucket.clone(),
        key: key.clone(),
        region: region.clone(),
        source: Box::new(source),
    };
    let store = builder.build().map_err(store_err)?;
    let options = PutOptions {
        attributes,
        ..PutOptions::default()
    };
    store
        .put_opts(
            &object_store::path::Path::from(key.as_str()),
            PutPayload::from(body),
            options,
        )
        .await
        .map_err(store_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::BlockModeDecrypt;
    use serde_json::json;

    fn material(key_len: usize) -> EncryptionMaterial {
        EncryptionMaterial::from_answer(&json!({
            "queryStageMasterKey": B64.encode(vec![7u8; key_len]),
            "queryId": "01b2-query",
            "smkId": 4711,
            "somethingNew": true,
        }))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn stage_info_parses_with_unknown_fields_and_secrets_stay_out_of_debug() {
        let target: UploadTarget = serde_json::from_value(json!({
            "locationType": "S3",
            "location": "sfc-stage-bucket/a1b2/stages/",
            "path": "stages/",
            "region": "eu-central-1",
            "storageAccount": null,
            "isClientSideEncrypted": true,
            "creds": {"AWS_KEY_ID": "ASIAKEYID", "AWS_SECRET_KEY": "s3cr3t-key", "AWS_TOKEN": "t0k3n-value"},
            "endPoint": null,
            "useS3RegionalUrl": false,
        }))
        .unwrap();
        assert_eq!(target.region.as_deref(), Some("eu-central-1"));
        assert_eq!(target.creds.key_id.as_deref(), Some("ASIAKEYID"));
        let shown = format!("{target:?} {:?}", material(32));
        assert!(shown.contains("ASIAKEYID"), "{shown}");
        for secret in ["s3cr3t-key", "t0k3n-value", &B64.encode([7u8; 32])] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn encryption_material_comes_as_object_list_or_null() {
        assert_eq!(EncryptionMaterial::from_answer(&Value::Null).unwrap(), None);
        let listed = EncryptionMaterial::from_answer(&json!([{
            "queryStageMasterKey": B64.encode([1u8; 16]), "queryId": "q", "smkId": "12"
        }]))
        .unwrap()
        .unwrap();
        assert_eq!(listed.smk_id, "12");
        assert_eq!(material(16).smk_id, "4711");
    }

    #[test]
    fn a_master_key_of_another_size_is_refused() {
        let mut bad = material(16);
        bad.query_stage_master_key = B64.encode([1u8; 24]);
        let err = encrypt_for_stage(&bad, b"x").unwrap_err();
        assert!(err.to_string().contains("192 bits"), "{err}");
    }

    #[test]
    fn encrypted_files_decrypt_with_the_unwrapped_file_key() {
        for key_len in [16, 32] {
            let m = material(key_len);
            let plain = b"PAR1 some parquet bytes PAR1".repeat(5);
            let enc = encrypt_for_stage(&m, &plain).unwrap();
            assert_eq!(enc.bytes.len(), (plain.len() / 16 + 1) * 16);
            let wrapped = B64.decode(&enc.wrapped_key).unwrap();
            assert_eq!(wrapped.len(), key_len + 16);
            let mut blocks: Vec<aes::Block> = wrapped
                .chunks_exact(16)
                .map(|c| aes::Block::try_from(c).unwrap())
                .collect();
            let master = B64.decode(&m.query_stage_master_key).unwrap();
            if key_len == 16 {
                aes::cipher::BlockCipherDecrypt::decrypt_blocks(
                    &aes::Aes128::new_from_slice(&master).unwrap(),
                    &mut blocks,
                );
            } else {
                aes::cipher::BlockCipherDecrypt::decrypt_blocks(
                    &aes::Aes256::new_from_slice(&master).unwrap(),
                    &mut blocks,
                );
            }
            let unwrapped: Vec<u8> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
            assert_eq!(&unwrapped[key_len..], &[16u8; 16]);
            let file_key = &unwrapped[..key_len];
            let iv = B64.decode(&enc.iv).unwrap();
            let mut buf = enc.bytes.clone();
            let decrypted = if key_len == 16 {
                cbc::Decryptor::<aes::Aes128>::new_from_slices(file_key, &iv)
                    .unwrap()
                    .decrypt_padded::<Pkcs7>(&mut buf)
                    .unwrap()
                    .to_vec()
            } else {
                cbc::Decryptor::<aes::Aes256>::new_from_slices(file_key, &iv)
                    .unwrap()
                    .decrypt_padded::<Pkcs7>(&mut buf)
                    .unwrap()
                    .to_vec()
            };
            assert_eq!(decrypted, plain);
            assert_eq!(
                enc.matdesc,
                format!(
                    r#"{{"queryId":"01b2-query","smkId":"4711","keySize":"{}"}}"#,
                    key_len * 8
                )
            );
        }
    }

    #[test]
    fn each_file_gets_its_own_key_and_iv() {
        let m = material(16);
        let a = encrypt_for_stage(&m, b"same").unwrap();
        let b = encrypt_for_stage(&m, b"same").unwrap();
        assert_ne!(a.iv, b.iv);
        assert_ne!(a.wrapped_key, b.wrapped_key);
        assert_ne!(a.bytes, b.bytes);
    }

    #[test]
    fn object_keys_join_the_stage_prefix_and_the_file_name() {
        assert_eq!(
            object_location("bucket/stages/abc/", "f.parquet"),
            Some(("bucket".into(), "stages/abc/f.parquet".into()))
        );
        assert_eq!(
            object_location("bucket/stages/abc", "f.parquet"),
            Some(("bucket".into(), "stages/abc/f.parquet".into()))
        );
        assert_eq!(
            object_location("bucket", "f.parquet"),
            Some(("bucket".into(), "f.parquet".into()))
        );
        assert_eq!(object_location("/x", "f"), None);
    }
}
