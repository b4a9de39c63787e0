//! TLS for tests: a self-signed certificate for 127.0.0.1 (rcgen),
//! written into the test's folder, and clients that trust only it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use otako_gateway::tls;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A self-signed certificate and key as PEM files, and a connector that
/// trusts that certificate alone.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    connector: TlsConnector,
}

impl TestCert {
    /// Writes `gateway.pem` and `gateway.key` into `dir`.
    pub fn new(dir: &Path) -> TestCert {
        let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .unwrap();
        let (cert_path, key_path) = (dir.join("gateway.pem"), dir.join("gateway.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
        TestCert {
            connector: tls::connector(Some(&cert_path)).unwrap(),
            cert: cert_path,
            key: key_path,
        }
    }

    /// A TLS connection to `addr`, the certificate verified.
    pub async fn connect(&self, addr: SocketAddr) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        self.connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap()
    }

    /// A WebSocket over TLS to `wss://addr{path}` with extra headers.
    pub async fn wss(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> WebSocketStream<TlsStream<TcpStream>> {
        let mut request = format!("wss://{addr}{path}").into_client_request().unwrap();
        for (name, value) in headers {
            let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(value).unwrap());
        }
        let stream = self.connect(addr).await;
        let (ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        ws
    }

    /// An HTTPS request; returns (status, body).
    pub async fn https_request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, String) {
        let stream = self.connect(addr).await;
        super::http_request_over(stream, addr, method, path, headers, body).await
    }
}
