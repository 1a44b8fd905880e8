//! Snowflake authentication: the key-pair JWT checked against Snowflake's own Python connector
//! and PyJWT (in the peers venv), encrypted PKCS#8 keys made by `openssl pkcs8 -topk8` as
//! Snowflake's guide does, and a login with each authenticator against fakesnow followed by a
//! load. fakesnow accepts any credentials, so these logins show that each request shape reaches
//! a server and gives a working session, not that a real account would accept the secret.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use collector::snowflake::{
    Authenticator, Credentials, KeyPair, SnowflakeClient, SnowflakeConfig, SnowflakeError, load,
};
use deltalake::DeltaTable;
use deltalake::kernel::{DataType, StructField};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use edge_agent::contract::{self, Quality, Row};
use pipeline_e2e::{FakeSnow, PeerVenv};
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::signature::Verifier;
use sha2::Sha256;

/// A fresh 2048-bit key (Snowflake's minimum) and its unencrypted PKCS#8 PEM.
fn new_key() -> (rsa::PrivateKey, String) {
    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("key generation");
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    (key, pem)
}

/// `pem` encrypted as Snowflake's key-pair guide does (`openssl pkcs8 -topk8 -v2 aes256`).
fn openssl_encrypt(pem: &str, passphrase: &str, dir: &Path) -> PathBuf {
    let plain = dir.join("plain.p8");
    std::fs::write(&plain, pem).unwrap();
    let out = dir.join("rsa_key.p8");
    let status = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes256", "-in"])
        .arg(&plain)
        .arg("-out")
        .arg(&out)
        .args(["-passout", &format!("pass:{passphrase}")])
        .status()
        .expect("the openssl command (Debian package `openssl`) encrypts the test key; install it or run ./tests/run.sh");
    assert!(status.success());
    std::fs::remove_file(plain).unwrap();
    out
}

fn decode_part(part: &str) -> serde_json::Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Runs Python in the peers venv, where Snowflake's connector and PyJWT live.
fn python(script: &str, args: &[&str]) -> String {
    let output = Command::new(PeerVenv::peers().python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("the peers venv's python runs");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn key_pair_jwt_carries_snowflakes_claims_and_verifies_with_the_public_key() {
    let (key, pem) = new_key();
    let public = key.to_public_key();
    let pair = KeyPair::new(key).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let jwt = pair
        .jwt(
            "xy12345.eu-central-1",
            "loader_user",
            now,
            Duration::from_mins(1),
        )
        .unwrap();

    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    assert_eq!(
        decode_part(parts[0]),
        serde_json::json!({"alg": "RS256", "typ": "JWT"})
    );
    let fingerprint = pair.fingerprint().to_owned();
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    assert_eq!(
        decode_part(parts[1]),
        serde_json::json!({
            "iss": format!("XY12345.LOADER_USER.{fingerprint}"),
            "sub": "XY12345.LOADER_USER",
            "iat": 1_750_000_000,
            "exp": 1_750_000_060,
        })
    );
    // an hour at most, whatever is asked
    let long = pair.jwt("acct", "u", now, Duration::from_hours(5)).unwrap();
    assert_eq!(
        decode_part(long.split('.').nth(1).unwrap())["exp"],
        1_750_003_600
    );

    // the signature verifies with the public key over `header.claims`, and not over anything else
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[2])
        .unwrap();
    let signature = Signature::try_from(signature.as_slice()).unwrap();
    let verifier = VerifyingKey::<Sha256>::new(public);
    let signed = format!("{}.{}", parts[0], parts[1]);
    verifier.verify(signed.as_bytes(), &signature).unwrap();
    assert!(
        verifier
            .verify(format!("{signed}x").as_bytes(), &signature)
            .is_err()
    );

    // Snowflake's own connector computes the same fingerprint from the key, and PyJWT accepts
    // the token with the public key
    let checked = python(
        r"
import sys, jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from snowflake.connector.auth.keypair import AuthByKeyPair
key = load_pem_private_key(sys.argv[1].encode(), password=None)
print(AuthByKeyPair.calculate_public_key_fingerprint(key))
claims = jwt.decode(sys.argv[2], key.public_key(), algorithms=['RS256'], options={'verify_exp': False})
print(claims['iss'])
",
        &[&pem, &jwt],
    );
    assert_eq!(
        checked,
        format!("{fingerprint}\nXY12345.LOADER_USER.{fingerprint}")
    );
}

#[test]
fn encrypted_keys_open_with_the_right_passphrase_and_name_the_problem_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (key, pem) = new_key();
    let expected = KeyPair::new(key).unwrap().fingerprint().to_owned();
    let encrypted = openssl_encrypt(&pem, "correct horse", dir.path());
    let text = std::fs::read_to_string(&encrypted).unwrap();
    assert!(text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));

    let right = collector::snowflake::Secret::new("correct horse");
    let pair = KeyPair::from_pem_file(&encrypted, Some(&right)).unwrap();
    assert_eq!(pair.fingerprint(), expected);
    // the Debug output never shows key material
    assert!(!format!("{pair:?}").contains("MII"));

    let wrong = collector::snowflake::Secret::new("battery staple");
    let err = KeyPair::from_pem_file(&encrypted, Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "snowflake.private_key_file: `{}`: cannot decrypt the private key",
            encrypted.display()
        )),
        "{err}"
    );
    assert!(err.contains("the passphrase"), "{err}");
    assert!(!err.contains("battery staple"), "{err}");

    let err = KeyPair::from_pem_file(&encrypted, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the private key is encrypted: set snowflake.private_key_passphrase_env"),
        "{err}"
    );

    let missing = dir.path().join("nope.p8");
    let err = KeyPair::from_pem_file(&missing, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "snowflake.private_key_file: cannot read `{}`",
            missing.display()
        )),
        "{err}"
    );
}

fn reading(seq: i64) -> Row {
    Row {
        seq,
        ts_us: 1_700_000_000_000_000 + seq * 1_000_000,
        site: "plant-a".into(),
        gateway: "gw-1".into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(20.0 + seq as f64),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

async fn delta_table_with(dir: &Path, rows: &[Row]) -> DeltaTable {
    std::fs::create_dir_all(dir).unwrap();
    let url = url::Url::from_directory_path(dir).unwrap();
    let fields: Vec<StructField> = contract::schema()
        .fields()
        .iter()
        .map(|f| {
            let ty = match f.name().as_str() {
                contract::column::SEQ => DataType::LONG,
                contract::column::TS => DataType::TIMESTAMP,
                contract::column::VALUE => DataType::DOUBLE,
                _ => DataType::STRING,
            };
            StructField::new(f.name(), ty, f.is_nullable())
        })
        .collect();
    let mut table = DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .create()
        .with_columns(fields)
        .await
        .unwrap();
    let mut writer = RecordBatchWriter::for_table(&table).unwrap();
    writer.write(contract::to_record_batch(rows)).await.unwrap();
    writer.flush_and_commit(&mut table).await.unwrap();
    table
}

fn config(server: &FakeSnow, auth: &str) -> SnowflakeConfig {
    toml::from_str(&format!(
        r#"
            url = "{}"
            account = "xy12345.eu-central-1"
            user = "plantline_loader"
            database = "DB_{}"
            schema = "RAW"
            request_timeout = "30s"
            {auth}
        "#,
        server.url(),
        uuid::Uuid::new_v4().simple()
    ))
    .expect("the test config parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_authenticator_logs_in_and_loads() {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Row> = (1..=3).map(reading).collect();
    let table = delta_table_with(&dir.path().join("lake"), &rows).await;

    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "pw-from-a-file\n").unwrap();
    let token_file = dir.path().join("oauth-token");
    std::fs::write(&token_file, "ver:1-hint:abc-token\n").unwrap();
    let passphrase_file = dir.path().join("passphrase");
    std::fs::write(&passphrase_file, "key pass\n").unwrap();
    let (_, pem) = new_key();
    let key_file = openssl_encrypt(&pem, "key pass", dir.path());

    let setups = [
        (
            Authenticator::Password,
            format!("password_file = {password_file:?}"),
        ),
        (
            Authenticator::KeyPair,
            format!(
                "authenticator = \"SNOWFLAKE_JWT\"\nprivate_key_file = {key_file:?}\nprivate_key_passphrase_file = {passphrase_file:?}"
            ),
        ),
        (
            Authenticator::OAuth,
            format!("authenticator = \"OAUTH\"\ntoken_file = {token_file:?}"),
        ),
    ];
    for (authenticator, auth) in setups {
        let cfg = config(&server, &auth);
        assert_eq!(cfg.authenticator, authenticator);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let credentials = cfg.credentials().unwrap();
        assert_eq!(credentials.authenticator(), authenticator);
        let debug = format!("{credentials:?}");
        for secret in ["pw-from-a-file", "abc-token", "key pass", "MII"] {
            assert!(!debug.contains(secret), "{debug}");
        }

        let mut client = SnowflakeClient::login(&cfg).await.unwrap();
        let report = load(&mut client, &table, &cfg).await.unwrap();
        assert_eq!(report.rows_inserted, 3, "{authenticator:?}");
        let count = client
            .execute("SELECT COUNT(*), MIN(SEQ), MAX(SEQ) FROM READINGS", &[])
            .await
            .unwrap();
        assert_eq!(
            (
                count.i64_at(0, 0).unwrap(),
                count.i64_at(0, 1).unwrap(),
                count.i64_at(0, 2).unwrap()
            ),
            (Some(3), Some(1), Some(3)),
            "{authenticator:?}"
        );
    }

    // a key file that went missing is named at login, without a request
    let cfg = config(
        &server,
        &format!(
            "authenticator = \"SNOWFLAKE_JWT\"\nprivate_key_file = {:?}",
            dir.path().join("gone.p8")
        ),
    );
    let err = SnowflakeClient::login(&cfg).await.unwrap_err();
    assert!(
        matches!(err, SnowflakeError::Credentials(_))
            && err
                .to_string()
                .starts_with("snowflake.private_key_file: cannot read `"),
        "{err}"
    );

    // credentials from elsewhere (a secret manager) work the same way
    let cfg = config(&server, "password_env = \"UNUSED_HERE\"");
    let mut client = SnowflakeClient::login_with(
        &cfg,
        Credentials::OAuth(collector::snowflake::Secret::new("t")),
    )
    .await
    .unwrap();
    assert_eq!(
        client
            .execute("SELECT 1", &[])
            .await
            .unwrap()
            .i64_at(0, 0)
            .unwrap(),
        Some(1)
    );
}
