//! Certificates for tests, made by `openssl` (installed by scripts/setup.sh): CAs, and certificates
//! they sign for 127.0.0.1 and localhost, usable as server and as client certificates.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::TlsFiles;

/// A directory of certificates.
pub struct TestCerts {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/setup.sh installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCerts {
    /// An empty directory; [`TestCerts::ca`] and [`TestCerts::issue`] fill it.
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed CA, `<name>.crt` and `<name>.key`.
    pub fn ca(&self, name: &str) -> &Self {
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        let subject = format!("/CN={name}");
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &crt,
                "-subj",
                &subject,
                "-days",
                "2",
            ],
        );
        self
    }

    /// `<name>.crt` and `<name>.key`, signed by the CA `ca`, for 127.0.0.1 and localhost, for
    /// servers and clients alike.
    pub fn issue(&self, name: &str, ca: &str) -> &Self {
        self.issue_for(name, ca, "IP:127.0.0.1,DNS:localhost")
    }

    /// [`Self::issue`] for the subject alternative names `sans` (openssl's form: `DNS:a,IP:1.2.3.4`).
    pub fn issue_for(&self, name: &str, ca: &str, sans: &str) -> &Self {
        let (crt, key, csr, ext) =
            (format!("{name}.crt"), format!("{name}.key"), format!("{name}.csr"), format!("{name}.ext"));
        std::fs::write(
            self.path(&ext),
            format!(
                "subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
            ),
        )
        .expect("ext file");
        let subject = format!("/CN={name}");
        openssl(
            self.dir.path(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subject,
            ],
        );
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
        self
    }

    /// `<name>.crt`/`<name>.key` as a pod's files, with `ca.crt` as the client CA when `ca` is given.
    pub fn files(&self, name: &str, ca: Option<&str>) -> TlsFiles {
        TlsFiles::from_flags(
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
            ca.map(|ca| self.path(&format!("{ca}.crt"))),
        )
    }
}
