//! Item 5: `https://` moonraker_url works (rustls, no OpenSSL), against the real Moonraker
//! serving HTTPS with a certificate from a CA made here. The CA reaches kflash the way a
//! user's own CA does: `SSL_CERT_FILE` (or the system store). One test in its own binary,
//! since it sets `SSL_CERT_FILE` for the process.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kflash::moonraker::{Moonraker, MoonrakerError};
use kflash::safety::{clear_to_stop_klipper, GateOptions, PrintCheck};
use support::real_moonraker::{Config, RealMoonraker};
use support::Answers;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for localhost and 127.0.0.1 signed by it.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kflash test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test]
async fn https_moonraker_url_works_with_the_users_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let m = RealMoonraker::start(Config {
        trusted: true,
        tls: Some((certs.path().join("srv.pem"), certs.path().join("srv.key"))),
        ..Config::default()
    });
    let url = format!("https://localhost:{}", m.ssl_port.unwrap());

    // A CA the client does not know: the handshake fails. That is not "nothing listens".
    std::env::remove_var("SSL_CERT_FILE");
    let err = Moonraker::new(&url, None, Duration::from_secs(10)).server_info().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::Unreachable { refused: false, .. }), "{err:?}");

    std::env::set_var("SSL_CERT_FILE", certs.path().join("ca.pem"));
    let c = Moonraker::new(&url, None, Duration::from_secs(10));
    let info = c.server_info().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.klippy_state, "disconnected");
    let clearance = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut Answers::no()).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::KlippyDisconnected);
}
