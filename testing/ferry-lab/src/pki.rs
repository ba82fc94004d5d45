//! Throwaway certificates for TLS tests and benchmarks: a CA and the ends it signs, as PEM
//! text or files (the form `ferry migrate --tls-*` and `ferry receive --tls-*` read).

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// An end's certificate and private key, PEM.
#[derive(Debug, Clone)]
pub struct TestEnd {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

/// Where [`TestCa::write_end`] put an end's files.
#[derive(Debug, Clone)]
pub struct TestFiles {
    /// The end's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA's certificate.
    pub ca: PathBuf,
}

impl TestCa {
    /// A new CA called `name`, with a fresh key.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generating a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("signing the CA").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `names` (DNS names or IP addresses), usable by a source and a
    /// destination alike.
    pub fn end(&self, names: &[&str]) -> TestEnd {
        let key = KeyPair::generate().expect("generating a key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        TestEnd {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// Writes an end for `names` as `<dir>/<stem>-cert.pem` and `<stem>-key.pem`, with this
    /// CA's certificate as `<dir>/<stem>-ca.pem`.
    pub fn write_end(&self, dir: &Path, stem: &str, names: &[&str]) -> io::Result<TestFiles> {
        let end = self.end(names);
        let files = TestFiles {
            cert: dir.join(format!("{stem}-cert.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            ca: dir.join(format!("{stem}-ca.pem")),
        };
        std::fs::write(&files.cert, end.cert)?;
        std::fs::write(&files.key, end.key)?;
        std::fs::write(&files.ca, &self.pem)?;
        Ok(files)
    }
}

impl TestFiles {
    /// The files as `--tls-cert C --tls-key K --tls-ca A` arguments.
    pub fn args(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ]
        .iter()
        .flat_map(|(flag, p)| [flag.to_string(), p.display().to_string()])
        .collect()
    }
}
