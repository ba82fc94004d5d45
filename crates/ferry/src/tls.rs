//! The `--tls-*` options shared by every command that opens or accepts a migration stream.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_migration::{Tls, TlsFiles};

/// Mutually authenticated TLS for the migration stream.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// This host's certificate (PEM). With --tls-key and --tls-ca the migration stream is
    /// TLS 1.3 and each end must prove a certificate signed by that CA; without them it is
    /// plain, for trusted networks and Unix sockets.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM), for --tls-cert.
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) the peer's certificate must be signed by.
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, as absolute paths (a VMM started elsewhere reads them), if TLS is asked for.
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let abs = |p: &PathBuf| {
            std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
        };
        Ok(Some(TlsFiles {
            cert: abs(cert)?,
            key: abs(key)?,
            ca: abs(ca)?,
        }))
    }

    /// The loaded credentials, if TLS is asked for.
    pub fn load(&self) -> Result<Option<Tls>> {
        self.files()?
            .map(|f| Tls::from_files(&f).map_err(anyhow::Error::from))
            .transpose()
    }
}
