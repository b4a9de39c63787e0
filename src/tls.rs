//! TLS with rustls (the `ring` provider, already built for sqlx and NATS):
//! the listeners' server identity from PEM files, and the dispatch
//! client's trust roots. Every error names the file it is about.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("{} and {}: not a usable certificate and key: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: not a usable trust root: {source}", path.display())]
    Root {
        path: PathBuf,
        source: rustls::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Largest PEM file read: a long chain is a few tens of KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A PEM file's bytes. Only regular files, and at most [`MAX_PEM_BYTES`]:
/// a path naming a FIFO or `/dev/zero` is an error, not a hang.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let invalid = |what: &str| error(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    // Checked before opening: opening a FIFO blocks until a writer comes.
    if !std::fs::metadata(path).map_err(error)?.is_file() {
        return Err(invalid("not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(invalid("larger than 1 MiB"));
    }
    Ok(bytes)
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error("no PEM certificate in it".to_owned()));
    }
    Ok(certs)
}

/// A listener's TLS identity: `cert` is a PEM chain (leaf first), `key`
/// its PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(cert)?;
    let private = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        what: format!("no PEM private key in it: {e}"),
    })?;
    let identity = |source| TlsError::Identity {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(identity)?;
    // Both listeners that take TLS speak HTTP/1.1 (the WebSocket upgrade).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The dispatch client's TLS: trusts the certificates in `ca` (a PEM file,
/// for a private CA or a self-signed gateway), else the webpki roots
/// (Mozilla's list, compiled in).
pub fn connector(ca: Option<&Path>) -> Result<TlsConnector, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert).map_err(|source| TlsError::Root {
                    path: path.to_owned(),
                    source,
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Root {
            path: ca.map(Path::to_owned).unwrap_or_default(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
