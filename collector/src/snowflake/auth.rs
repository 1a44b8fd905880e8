//! How the collector proves who it is to Snowflake: a password, a key pair (a JWT signed with
//! the user's RSA private key, Snowflake's `SNOWFLAKE_JWT` authenticator) or an OAuth access
//! token.
//!
//! # Invariants
//! - Secrets are read when a session is opened, never at config load, so a rotated password,
//!   key or token file takes effect at the next login without a restart.
//! - No secret is ever formatted: [`Secret`] and [`Credentials`] print `***` in their `Debug`
//!   output, and error messages name the environment variable or file, never its content.
//! - A key-pair JWT is made fresh for every login and lives [`JWT_LIFETIME`], far inside the
//!   hour Snowflake allows.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rsa::PrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::signature::{SignatureEncoding, Signer};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

/// How long a key-pair JWT is valid. It is only used for the login request, so a short life
/// limits what a leaked token is worth; the drivers use the same minute.
pub const JWT_LIFETIME: Duration = Duration::from_mins(1);
/// Snowflake refuses key-pair JWTs whose `exp` is more than an hour after `iat`.
pub const JWT_MAX_LIFETIME: Duration = Duration::from_hours(1);

/// The authenticators the collector speaks, spelled as Snowflake's drivers spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Authenticator {
    /// User name and password.
    #[default]
    #[serde(rename = "SNOWFLAKE", alias = "snowflake", alias = "password")]
    Password,
    /// Key-pair authentication: a JWT signed with the user's RSA private key.
    #[serde(rename = "SNOWFLAKE_JWT", alias = "snowflake_jwt")]
    KeyPair,
    /// An OAuth access token issued by the account's OAuth integration or an external server.
    #[serde(rename = "OAUTH", alias = "oauth")]
    OAuth,
}

impl Authenticator {
    /// The value of `authenticator` in the config and in the login request.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Password => "SNOWFLAKE",
            Self::KeyPair => "SNOWFLAKE_JWT",
            Self::OAuth => "OAUTH",
        }
    }
}

/// A secret string (password, passphrase, token). Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret obtained by the caller.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a secret comes from: an environment variable or a file (its content with the final
/// line break removed, as `echo` and editors leave one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `key` is the config key that named the variable, for messages.
    Env { key: &'static str, var: String },
    /// `key` is the config key that named the file.
    File { key: &'static str, path: PathBuf },
}

/// Why credentials could not be made. Every message names the config key and the variable or
/// file, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "authenticator = \"{authenticator}\" has no secret configured; run `collector validate` for the keys it needs"
    )]
    NotConfigured { authenticator: &'static str },
    #[error(
        "the Snowflake password is not set: export it in the environment variable `{var}` (named by snowflake.password_env)"
    )]
    MissingPassword { var: String },
    #[error(
        "snowflake.{key}: the environment variable `{var}` is not set or empty; export it before starting the collector"
    )]
    MissingEnv { key: &'static str, var: String },
    #[error("snowflake.{key}: cannot read `{path}`: {detail}")]
    File {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("snowflake.{key}: `{path}` is empty")]
    EmptyFile { key: &'static str, path: PathBuf },
    #[error("snowflake.private_key_file: `{path}`: {detail}")]
    PrivateKey { path: PathBuf, detail: String },
    #[error("signing the key-pair JWT failed: {detail}")]
    Sign { detail: String },
}

impl SecretSource {
    /// Reads the secret now.
    pub fn read(&self) -> Result<Secret, AuthError> {
        match self {
            Self::Env { key, var } => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                _ if *key == "password_env" => Err(AuthError::MissingPassword { var: var.clone() }),
                _ => Err(AuthError::MissingEnv {
                    key,
                    var: var.clone(),
                }),
            },
            Self::File { key, path } => {
                let text = std::fs::read_to_string(path).map_err(|e| AuthError::File {
                    key,
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                let text = text.strip_suffix('\r').unwrap_or(text);
                if text.is_empty() {
                    return Err(AuthError::EmptyFile {
                        key,
                        path: path.clone(),
                    });
                }
                Ok(Secret(text.to_owned()))
            }
        }
    }
}

/// A private key with what Snowflake identifies it by.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey<Sha256>,
    fingerprint: String,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("private_key", &"***")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Wraps an RSA private key.
    pub fn new(key: PrivateKey) -> Result<Self, AuthError> {
        let fingerprint = public_key_fingerprint(&key)?;
        Ok(Self {
            signing: SigningKey::<Sha256>::new(key),
            fingerprint,
        })
    }

    /// Reads a PKCS#8 PEM private key file (`-----BEGIN PRIVATE KEY-----`, or
    /// `-----BEGIN ENCRYPTED PRIVATE KEY-----` with `passphrase`).
    pub fn from_pem_file(path: &Path, passphrase: Option<&Secret>) -> Result<Self, AuthError> {
        let pem = std::fs::read_to_string(path).map_err(|e| AuthError::File {
            key: "private_key_file",
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        Self::from_pem(&pem, passphrase).map_err(|detail| AuthError::PrivateKey {
            path: path.to_owned(),
            detail,
        })
    }

    /// Parses a PKCS#8 PEM private key; the error says what is wrong and how to fix it.
    pub fn from_pem(pem: &str, passphrase: Option<&Secret>) -> Result<Self, String> {
        let encrypted = pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----");
        let key = match (encrypted, passphrase) {
            (true, Some(pass)) => PrivateKey::from_pkcs8_encrypted_pem(pem, pass.expose())
                .map_err(|e| {
                    format!(
                        "cannot decrypt the private key ({e}): the passphrase (snowflake.private_key_passphrase_env or _file) is wrong, or the key uses a cipher other than PBES2 with AES"
                    )
                })?,
            (true, None) => {
                return Err("the private key is encrypted: set snowflake.private_key_passphrase_env or snowflake.private_key_passphrase_file".to_owned());
            }
            (false, _) if pem.contains("-----BEGIN RSA PRIVATE KEY-----") => {
                return Err("the key is in PKCS#1 format (BEGIN RSA PRIVATE KEY); convert it to PKCS#8 with `openssl pkcs8 -topk8 -v2 aes256 -in key.pem -out rsa_key.p8`".to_owned());
            }
            (false, _) => PrivateKey::from_pkcs8_pem(pem).map_err(|e| {
                format!(
                    "not a PKCS#8 RSA private key in PEM format ({e}); Snowflake's key-pair guide makes one with `openssl genrsa 2048 | openssl pkcs8 -topk8 -v2 aes256 -out rsa_key.p8`"
                )
            })?,
        };
        Self::new(key).map_err(|e| e.to_string())
    }

    /// `SHA256:<base64 of the SHA-256 of the public key's DER>`, as `DESC USER` shows it in
    /// `RSA_PUBLIC_KEY_FP`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A JWT for Snowflake's `SNOWFLAKE_JWT` authenticator, issued at `now`, valid `lifetime`
    /// (at most an hour).
    pub fn jwt(
        &self,
        account: &str,
        user: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, AuthError> {
        let lifetime = lifetime.min(JWT_MAX_LIFETIME);
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|e| AuthError::Sign {
                detail: format!("the clock is before 1970: {e}"),
            })?
            .as_secs();
        let subject = format!("{}.{}", jwt_account(account), user.to_ascii_uppercase());
        let claims = json!({
            "iss": format!("{subject}.{}", self.fingerprint),
            "sub": subject,
            "iat": iat,
            "exp": iat + lifetime.as_secs(),
        });
        let header = json!({"alg": "RS256", "typ": "JWT"});
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let signature = self
            .signing
            .try_sign(signing_input.as_bytes())
            .map_err(|e| AuthError::Sign {
                detail: e.to_string(),
            })?;
        Ok(format!(
            "{signing_input}.{}",
            b64.encode(signature.to_bytes())
        ))
    }
}

/// The account part of a key-pair JWT's claims: upper case, without the region and cloud of an
/// account locator (`xy12345.eu-central-1` → `XY12345`); for a global URL's account
/// (`myorg-acct.global`), the part before the first `-`. Organisation-account names
/// (`myorg-myaccount`) stay whole.
pub fn jwt_account(account: &str) -> String {
    let account = if account.contains(".global") {
        account.split('-').next().unwrap_or(account)
    } else {
        account.split('.').next().unwrap_or(account)
    };
    account.to_ascii_uppercase()
}

/// `SHA256:` and the standard base64 of the SHA-256 digest of the public key's DER
/// (`SubjectPublicKeyInfo`), which is how Snowflake names a registered key.
pub fn public_key_fingerprint(key: &PrivateKey) -> Result<String, AuthError> {
    let der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| AuthError::Sign {
            detail: format!("cannot encode the public key: {e}"),
        })?;
    let digest = Sha256::digest(der.as_bytes());
    Ok(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// What one login sends, read from the configured sources at login time.
#[derive(Debug, Clone)]
pub enum Credentials {
    Password(Secret),
    KeyPair(Box<KeyPair>),
    OAuth(Secret),
}

impl Credentials {
    /// The authenticator these credentials are for.
    pub fn authenticator(&self) -> Authenticator {
        match self {
            Self::Password(_) => Authenticator::Password,
            Self::KeyPair(_) => Authenticator::KeyPair,
            Self::OAuth(_) => Authenticator::OAuth,
        }
    }

    /// The fields of the login request's `data` object that carry the credentials.
    pub(crate) fn login_fields(
        &self,
        account: &str,
        user: &str,
        now: SystemTime,
    ) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
        let mut fields = serde_json::Map::new();
        match self {
            Self::Password(password) => {
                fields.insert("PASSWORD".into(), password.expose().into());
            }
            Self::KeyPair(key) => {
                fields.insert("AUTHENTICATOR".into(), "SNOWFLAKE_JWT".into());
                fields.insert(
                    "TOKEN".into(),
                    key.jwt(account, user, now, JWT_LIFETIME)?.into(),
                );
            }
            Self::OAuth(token) => {
                fields.insert("AUTHENTICATOR".into(), "OAUTH".into());
                fields.insert("TOKEN".into(), token.expose().into());
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_in_claims_drops_region_and_is_upper_case() {
        assert_eq!(jwt_account("xy12345.eu-central-1.aws"), "XY12345");
        assert_eq!(jwt_account("myorg-myaccount"), "MYORG-MYACCOUNT");
        assert_eq!(jwt_account("xy12345-acct.global"), "XY12345");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let creds = Credentials::Password(Secret::new("hunter2"));
        assert_eq!(format!("{creds:?}"), "Password(Secret(***))");
        let oauth = Credentials::OAuth(Secret::new("ey.token"));
        assert!(!format!("{oauth:?}").contains("ey.token"));
    }

    #[test]
    fn secret_files_lose_their_final_line_break_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc def\n").unwrap();
        let source = SecretSource::File {
            key: "token_file",
            path: path.clone(),
        };
        assert_eq!(source.read().unwrap().expose(), "abc def");
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(
            source.read().unwrap_err().to_string(),
            format!("snowflake.token_file: `{}` is empty", path.display())
        );
        let missing = SecretSource::Env {
            key: "token_env",
            var: "PLANTLINE_TEST_NO_SUCH_TOKEN".into(),
        };
        assert_eq!(
            missing.read().unwrap_err().to_string(),
            "snowflake.token_env: the environment variable `PLANTLINE_TEST_NO_SUCH_TOKEN` is not set or empty; export it before starting the collector"
        );
    }

    #[test]
    fn a_pkcs1_key_is_refused_with_the_conversion_command() {
        let err = KeyPair::from_pem(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n",
            None,
        )
        .unwrap_err();
        assert!(err.contains("openssl pkcs8 -topk8"), "{err}");
        let err = KeyPair::from_pem(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
            None,
        )
        .unwrap_err();
        assert!(err.starts_with("the private key is encrypted"), "{err}");
    }
}
