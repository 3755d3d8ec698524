//! A client for the API socket (reqwest over a Unix socket), used by `hype ctl` and tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hype_api::model::{ErrorReply, VmInfo};

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Building the HTTP client failed.
    #[error("cannot set up the HTTP client")]
    Setup(#[source] reqwest::Error),
    /// The request did not get an answer (socket missing, VMM gone, timeout).
    #[error("no answer from {path}")]
    Request {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{message} (HTTP {status})")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's one-line reason.
        message: String,
    },
    /// The answer was not the JSON expected.
    #[error("unexpected answer")]
    Decode(#[source] serde_json::Error),
}

/// An answer: status and body.
#[derive(Clone, Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A client bound to one API socket.
pub struct Client {
    path: PathBuf,
    http: reqwest::blocking::Client,
}

impl Client {
    /// A client for the socket at `path`; every request gets at most `timeout`.
    pub fn new(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let http = reqwest::blocking::Client::builder()
            .unix_socket(path)
            .timeout(timeout)
            .build()
            .map_err(ClientError::Setup)?;
        Ok(Client {
            path: path.to_owned(),
            http,
        })
    }

    /// Sends `method path` with an optional JSON body; returns the answer whatever its status.
    pub fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ClientError> {
        let mut rb = self.http.request(method, format!("http://localhost{path}"));
        if let Some(b) = body {
            rb = rb
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let req_err = |source| ClientError::Request {
            path: self.path.clone(),
            source,
        };
        let resp = rb.send().map_err(req_err)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().map_err(req_err)?.to_vec();
        Ok(Answer { status, body })
    }

    /// Like [`Client::send`], but an error status becomes [`ClientError::Status`].
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ClientError> {
        let a = self.send(method, path, body)?;
        if a.status >= 400 {
            let message = serde_json::from_slice::<ErrorReply>(&a.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&a.body).into_owned());
            return Err(ClientError::Status {
                status: a.status,
                message,
            });
        }
        Ok(a)
    }

    /// `GET /vm`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        let a = self.call(reqwest::Method::GET, "/vm", None)?;
        serde_json::from_slice(&a.body).map_err(ClientError::Decode)
    }
}
