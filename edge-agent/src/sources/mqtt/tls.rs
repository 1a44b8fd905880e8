//! TLS to a broker (`[mqtt.tls]`): the rustls client configuration built from PEM files, and
//! the words for a handshake that failed.
//!
//! # What always holds
//! - The crypto is the ring provider the agent's AWS clients use too: one rustls and one crypto
//!   library in the agent (aws-lc, the SDK's default, is kept out for the binary's size).
//! - `validate` builds the very configuration the source connects with ([`client_config`]), so a
//!   map that validates has readable files, a CA that parses, and a client key that belongs to
//!   its certificate (rustls compares their public keys).
//! - Errors name the config key, the file and the fix. They never hold the private key's bytes,
//!   nor a password: only file paths, PEM section names and rustls' own descriptions.
//! - The files are read again whenever the source connects anew, so a renewed certificate or
//!   key written over the old files is used from the next connection on, without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    SignatureScheme,
};

use crate::config::MqttTls;

/// Why the TLS configuration of a broker cannot be built. Every variant names its config key
/// ([`TlsError::key`]) and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read {key} {}: {source}; check the path and that the agent's user may read it",
        path.display()
    )]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{key} {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`){hint}",
        path.display()
    )]
    NoCertificate {
        key: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("{key} {} is not valid PEM: {detail}; export the file again in PEM form", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "tls.ca_file {}: no certificate in it can be trusted as a CA: {detail}; give the PEM certificate of the CA that signed the broker's certificate",
        path.display()
    )]
    BadCa { path: PathBuf, detail: String },
    #[error(
        "tls.client_key_file {} holds no private key (`-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`); give the key of tls.client_cert_file in PEM",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error(
        "tls.client_key_file {} is encrypted with a passphrase, which the agent cannot use; write it unencrypted (`openssl pkey -in KEY -out KEY.pem`), readable by the agent's user only",
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error(
        "tls.client_key_file {} is not the key of tls.client_cert_file {} (the certificate holds another public key); give the key that was made with this certificate",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error(
        "tls.client_key_file {} cannot be used: {detail}; give an RSA, ECDSA (P-256, P-384) or Ed25519 key in PEM",
        path.display()
    )]
    BadKey { path: PathBuf, detail: String },
    #[error(
        "tls.server_name `{name}` is not a DNS name or an IP address; write the name the broker's certificate carries, for example server_name = \"broker.line3.local\""
    )]
    ServerName { name: String },
    #[error("{key} is set without {missing}; give both, or neither")]
    Unpaired {
        key: &'static str,
        missing: &'static str,
    },
    #[error("the TLS library refused the configuration: {detail}")]
    Config { detail: String },
}

impl TlsError {
    /// The config key under `[mqtt.tls]` the problem is about (for `validate`).
    pub fn key(&self) -> &'static str {
        match self {
            Self::Read { key, .. }
            | Self::NoCertificate { key, .. }
            | Self::Pem { key, .. }
            | Self::Unpaired { key, .. } => key,
            Self::BadCa { .. } | Self::Config { .. } => "tls.ca_file",
            Self::NoKey { .. }
            | Self::EncryptedKey { .. }
            | Self::KeyMismatch { .. }
            | Self::BadKey { .. } => "tls.client_key_file",
            Self::ServerName { .. } => "tls.server_name",
        }
    }
}

/// The crypto provider of every MQTT TLS connection: ring, as the AWS clients'.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration for `tls`, reading its files now.
pub(crate) fn client_config(tls: &MqttTls) -> Result<Arc<ClientConfig>, TlsError> {
    let client_files = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(_), None) => {
            return Err(TlsError::Unpaired {
                key: "tls.client_cert_file",
                missing: "tls.client_key_file",
            });
        }
        (None, Some(_)) => {
            return Err(TlsError::Unpaired {
                key: "tls.client_key_file",
                missing: "tls.client_cert_file",
            });
        }
        (None, None) => None,
    };
    let provider = provider();
    let roots = root_store(&tls.ca_file)?;
    let webpki =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::BadCa {
                path: tls.ca_file.clone(),
                detail: e.to_string(),
            })?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            detail: e.to_string(),
        })?;
    let builder = match &tls.server_name {
        None => builder.with_webpki_verifier(webpki),
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|_| TlsError::ServerName { name: name.clone() })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedServer {
                    name,
                    inner: webpki,
                }))
        }
    };
    let config = match client_files {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let chain = certificates("tls.client_cert_file", cert_path)?;
            let key = private_key(key_path)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        TlsError::KeyMismatch {
                            key_path: key_path.clone(),
                            cert_path: cert_path.clone(),
                        }
                    }
                    other => TlsError::BadKey {
                        path: key_path.clone(),
                        detail: other.to_string(),
                    },
                })?
        }
    };
    Ok(Arc::new(config))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            key,
            path: path.to_owned(),
            detail: pem_problem(&e),
        })?;
    if certs.is_empty() {
        let hint = if contains(&bytes, b"PRIVATE KEY-----") {
            "; it holds a private key: give the certificate file here"
        } else if bytes.first() == Some(&0x30) {
            // An ASN.1 SEQUENCE: a DER certificate.
            "; it looks like DER: convert it with `openssl x509 -inform der -in FILE -out FILE.pem`"
        } else {
            ""
        };
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
            hint,
        });
    }
    Ok(certs)
}

/// The trust anchors of `ca_file`: every certificate in it that parses as one.
fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut refused = Vec::new();
    for cert in certificates("tls.ca_file", path)? {
        if let Err(e) = roots.add(cert) {
            refused.push(e.to_string());
        }
    }
    if roots.is_empty() {
        return Err(TlsError::BadCa {
            path: path.to_owned(),
            detail: refused.join("; "),
        });
    }
    Ok(roots)
}

/// The private key in a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("tls.client_key_file", path)?;
    if contains(&bytes, b"ENCRYPTED PRIVATE KEY-----")
        || contains(&bytes, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsError::EncryptedKey {
            path: path.to_owned(),
        });
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        other => TlsError::Pem {
            key: "tls.client_key_file",
            path: path.to_owned(),
            detail: pem_problem(&other),
        },
    })
}

/// A PEM problem in words, without the file's contents (it may be a key).
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no `-----END` line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "a `-----BEGIN` line is malformed".to_owned(),
        pem::Error::Base64Decode(_) => "a section is not valid base64".to_owned(),
        pem::Error::SectionTooLarge => "a section is larger than 256 MB".to_owned(),
        pem::Error::NoItemsFound => "nothing usable in it".to_owned(),
        other => other.to_string(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Checks the broker's certificate for `name` (`tls.server_name`) instead of the host the agent
/// connects to; everything else is the standard WebPKI verification against `ca_file`.
#[derive(Debug)]
struct NamedServer {
    name: ServerName<'static>,
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NamedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// What to do about a TLS handshake that failed with `error`, if it is one rustls reports; the
/// error itself is logged as it is, this adds the fix.
pub(crate) fn handshake_hint(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(hint_for(tls));
        }
        // rumqttc hands rustls' errors on inside an io::Error.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(hint_for(tls));
        }
        source = e.source();
    }
    None
}

fn hint_for(error: &rustls::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => {
            "the broker's certificate is not signed by a CA in tls.ca_file; set ca_file to the certificate of the CA that signed it"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            "the broker's certificate does not name the host the agent connects to; connect by a name in the certificate, or set tls.server_name to one"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => {
            "the broker's certificate is expired or not valid yet; renew it, or check the gateway's clock"
        }
        rustls::Error::InvalidCertificate(_) => {
            "the broker's certificate was refused; check that tls.ca_file is the CA that signed it"
        }
        rustls::Error::AlertReceived(
            Alert::CertificateRequired | Alert::HandshakeFailure | Alert::BadCertificate,
        ) => {
            "the broker refused the connection at the TLS handshake; if it asks for client certificates, set tls.client_cert_file and tls.client_key_file to a certificate its CA signed"
        }
        rustls::Error::AlertReceived(Alert::UnknownCA) => {
            "the broker does not trust the agent's client certificate; have it signed by the CA the broker trusts (Mosquitto: cafile)"
        }
        rustls::Error::AlertReceived(
            Alert::CertificateExpired | Alert::CertificateRevoked | Alert::CertificateUnknown,
        ) => "the broker refused the agent's client certificate; renew it",
        _ => {
            "check that the port is the broker's TLS listener and that both sides share a TLS version"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(dir: &Path) -> MqttTls {
        MqttTls {
            ca_file: dir.join("ca.pem"),
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
        }
    }

    fn error(tls: &MqttTls) -> String {
        match client_config(tls) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{}: {e}", e.key()),
        }
    }

    #[test]
    fn a_missing_ca_file_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            error(&tls(dir.path())),
            format!(
                "tls.ca_file: cannot read tls.ca_file {}: No such file or directory (os error 2); check the path and that the agent's user may read it",
                dir.path().join("ca.pem").display()
            )
        );
    }

    #[test]
    fn a_ca_file_without_certificates_says_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert_eq!(
            error(&tls(dir.path())),
            format!(
                "tls.ca_file: tls.ca_file {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`); it holds a private key: give the certificate file here",
                ca.display()
            )
        );
        std::fs::write(&ca, [0x30, 0x82, 0x01, 0x0a]).unwrap();
        assert!(error(&tls(dir.path())).ends_with(
            "; it looks like DER: convert it with `openssl x509 -inform der -in FILE -out FILE.pem`"
        ));
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        assert_eq!(
            error(&tls(dir.path())),
            format!(
                "tls.ca_file: tls.ca_file {} is not valid PEM: a section has no `-----END` line; export the file again in PEM form",
                ca.display()
            )
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_before_any_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut tls = tls(dir.path());
        tls.client_cert_file = Some(dir.path().join("gw.pem"));
        assert_eq!(
            error(&tls),
            "tls.client_cert_file: tls.client_cert_file is set without tls.client_key_file; give both, or neither"
        );
        tls.client_cert_file = None;
        tls.client_key_file = Some(dir.path().join("gw.key"));
        assert_eq!(
            error(&tls),
            "tls.client_key_file: tls.client_key_file is set without tls.client_cert_file; give both, or neither"
        );
    }

    #[test]
    fn an_encrypted_key_is_refused_with_the_command_that_decrypts_it_and_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("gw.key");
        std::fs::write(
            &key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nU2VjcmV0S2V5Qnl0ZXM=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let message = private_key(&key).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "tls.client_key_file {} is encrypted with a passphrase, which the agent cannot use; write it unencrypted (`openssl pkey -in KEY -out KEY.pem`), readable by the agent's user only",
                key.display()
            )
        );
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nU2VjcmV0S2V5Qnl0ZXM!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let message = private_key(&key).unwrap_err().to_string();
        assert!(!message.contains("U2VjcmV0"), "{message}");
        assert_eq!(
            message,
            format!(
                "tls.client_key_file {} is not valid PEM: a section is not valid base64; export the file again in PEM form",
                key.display()
            )
        );
    }

    #[test]
    fn a_handshake_error_gets_the_fix_for_its_cause() {
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(
            handshake_hint(&unknown),
            Some(
                "the broker's certificate is not signed by a CA in tls.ca_file; set ca_file to the certificate of the CA that signed it"
            )
        );
        let refused = std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(
            handshake_hint(&refused)
                .unwrap()
                .contains("set tls.client_cert_file and tls.client_key_file")
        );
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(handshake_hint(&plain), None);
    }
}
