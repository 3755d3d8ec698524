//! The block-http tests' HTTP server: [`hype_testkit::http_server`] (plain HTTP, switchable
//! misbehaviour, request log), plus the https variant, which wraps each connection in rustls
//! here so that the test kit carries no TLS code. Test-only: failures panic.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use hype_testkit::http_server::{Behaviour, Logged};

/// A running test server; derefs to [`hype_testkit::http_server::HttpServer`].
pub struct HttpServer(hype_testkit::http_server::HttpServer);

impl std::ops::Deref for HttpServer {
    type Target = hype_testkit::http_server::HttpServer;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl HttpServer {
    /// A plain HTTP server.
    pub fn start(b: Behaviour) -> Self {
        HttpServer(hype_testkit::http_server::HttpServer::start(b).unwrap())
    }

    /// An https server with the certificate chain and key of the PEM files given.
    pub fn start_tls(b: Behaviour, cert: &Path, key: &Path) -> Self {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let server = hype_testkit::http_server::HttpServer::start_wrapped(b, "https", move |tcp| {
            let tls = rustls::ServerConnection::new(config.clone()).ok()?;
            Some(Box::new(rustls::StreamOwned::new(tls, tcp)))
        });
        HttpServer(server.unwrap())
    }

    /// Waits (10 s at most) until `pred` holds for the log; panics with the log otherwise.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Logged]) -> bool) {
        self.0
            .wait_for(what, Duration::from_secs(10), pred)
            .unwrap();
    }
}
