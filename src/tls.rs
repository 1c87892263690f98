//! TLS for the public listeners: certificate loading (checked at config time, so a bad
//! file is a startup error, not a panic inside pingora), and the rustls certificate
//! resolver the listener uses.
//!
//! Uses rustls directly, not pingora, so config checking (`ssegate -t`) can load and
//! verify certificates without building a server.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate/key pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or parsed.
    #[error("cannot load certificate {path}: {reason}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file could not be read or parsed, or does not match the certificate.
    #[error("cannot load private key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl TlsError {
    /// True when the key file (not the certificate) is at fault.
    pub fn is_key_error(&self) -> bool {
        matches!(self, TlsError::Key { .. })
    }
}

/// A certificate chain and its private key, loaded and checked to match.
#[derive(Debug)]
pub struct CertKey {
    /// The rustls form, shared with every handshake.
    pub certified: Arc<CertifiedKey>,
}

/// The crypto provider pingora's rustls build uses (ring).
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Largest PEM file read: a chain of a few certificates is some kilobytes.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Refuses what is not a PEM file of sane size (a device or a FIFO would never end).
fn check_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!("larger than {MAX_PEM_BYTES} bytes"));
    }
    Ok(())
}

impl CertKey {
    /// Loads a PEM chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertKey, TlsError> {
        let cert_err = |reason: String| TlsError::Cert {
            path: cert_path.to_owned(),
            reason,
        };
        let key_err = |reason: String| TlsError::Key {
            path: key_path.to_owned(),
            reason,
        };
        check_file(cert_path).map_err(cert_err)?;
        check_file(key_path).map_err(key_err)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| cert_err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| cert_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(cert_err("no PEM certificate in file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| key_err(e.to_string()))?;
        let certified = CertifiedKey::from_der(certs, key, &provider())
            .map_err(|e| key_err(format!("{e} (does the key belong to the certificate?)")))?;
        Ok(CertKey {
            certified: Arc::new(certified),
        })
    }
}

/// The certificates of one TLS listener: one per name asked for (SNI), and a default.
#[derive(Debug, Clone)]
pub struct CertSet {
    /// For clients that send no name, or one no other certificate has.
    pub default: Arc<CertifiedKey>,
    /// Lowercase host name to certificate.
    pub by_name: HashMap<String, Arc<CertifiedKey>>,
}

/// Checks that `cert` is valid for host `name` (as a client would, wildcards included);
/// returns the name in lowercase.
pub fn check_name(cert: &CertKey, name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let mut probe = rustls::server::ResolvesServerCertUsingSni::new();
    probe
        .add(&lower, (*cert.certified).clone())
        .map(|()| lower)
        .map_err(|e| format!("the certificate does not cover {name:?}: {e}"))
}

/// Chooses the certificate by SNI for every handshake; a reload can replace the set,
/// and the next handshake uses the new one.
#[derive(Debug)]
pub struct ReloadableCert {
    certs: arc_swap::ArcSwap<CertSet>,
    /// ClientHellos that reached certificate selection (handshakes started).
    hellos: prometheus::IntCounter,
}

impl ReloadableCert {
    /// Starts with `certs`; counts handshakes started in `hellos`.
    pub fn new(certs: CertSet, hellos: prometheus::IntCounter) -> ReloadableCert {
        ReloadableCert {
            certs: arc_swap::ArcSwap::from_pointee(certs),
            hellos,
        }
    }

    /// Replaces the certificates for new handshakes.
    pub fn set(&self, certs: CertSet) {
        self.certs.store(Arc::new(certs));
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.hellos.inc();
        let certs = self.certs.load();
        // Names are compared in lowercase, as DNS names are case-insensitive.
        let chosen = hello
            .server_name()
            .and_then(|n| certs.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&certs.default);
        Some(chosen.clone())
    }
}
