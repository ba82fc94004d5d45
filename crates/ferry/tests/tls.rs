//! Migration under TLS, as an operator runs it: two ferry processes (`ferry sim-receive` and
//! `ferry sim-send`, the engine with a simulated guest on each side, no KVM needed) with
//! `--tls-cert/--tls-key/--tls-ca` files. A source that cannot prove itself, a plain source, and
//! a stream altered in flight are refused; nothing they sent is restored; a destination
//! waiting with TLS goes on waiting for the right source.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use ferry_lab::pki::{TestCa, TestFiles};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A receiver process, killed if a test fails before it ended.
struct Receiver(Option<Child>);

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ferry sim-receive` on a free port; returns it and the address it listens on.
fn receiver(tls: Option<&TestFiles>) -> (Receiver, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(["sim-receive", "--memory", "16M", "--listen", "127.0.0.1:0"]);
    if let Some(t) = tls {
        cmd.args(t.args());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry sim-receive");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("LISTENING tcp:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (Receiver(Some(child)), addr)
}

/// `ferry sim-send` to `addr`, to its end.
fn send(addr: &str, tls: Option<&TestFiles>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(["sim-send", "--memory", "16M", "--connect", addr]);
    if let Some(t) = tls {
        cmd.args(t.args());
    }
    cmd.stdin(Stdio::null()).output().expect("ferry sim-send")
}

/// The receiver's end: its exit status, stdout and stderr.
fn finish(mut receiver: Receiver) -> (bool, String, String) {
    let mut child = receiver.0.take().unwrap();
    let status = child.wait().unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.success(), out, err)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn only_a_source_with_a_certificate_from_the_ca_gets_through() {
    let dir = temp_dir("auth");
    let ca = TestCa::new("ferry test CA");
    let dest = ca.write_end(&dir, "dest", &["127.0.0.1"]).unwrap();
    let source = ca.write_end(&dir, "source", &["source.example"]).unwrap();
    // A certificate from another CA, with our CA as its trust (so it accepts the destination).
    let stranger_ca = TestCa::new("someone else's CA");
    let mut stranger = stranger_ca
        .write_end(&dir, "stranger", &["stranger.example"])
        .unwrap();
    stranger.ca = source.ca.clone();
    let (child, addr) = receiver(Some(&dest));

    let plain = send(&addr, None);
    assert!(!plain.status.success(), "a plain source migrated");
    assert!(text(&plain).contains("speaks TLS"), "{}", text(&plain));

    let refused = send(&addr, Some(&stranger));
    assert!(!refused.status.success(), "a stranger migrated");
    let e = text(&refused);
    assert!(e.contains("refused this end's certificate"), "{e}");

    // The destination kept waiting, and takes the source it can authenticate.
    let good = send(&addr, Some(&source));
    assert!(good.status.success(), "{}", text(&good));
    let (ok, out, err) = finish(child);
    assert!(ok, "the receiver failed: {err}");
    assert!(out.contains("\"mismatches\":0"), "{out}");
    assert_eq!(
        err.matches("refused a connection").count(),
        2,
        "both strangers are in the destination's log: {err}"
    );
}

#[test]
fn a_tls_source_and_a_plain_destination_both_say_why() {
    let dir = temp_dir("plain-dest");
    let ca = TestCa::new("ferry test CA");
    let source = ca.write_end(&dir, "source", &["source.example"]).unwrap();
    let (child, addr) = receiver(None);
    let out = send(&addr, Some(&source));
    assert!(!out.status.success());
    assert!(text(&out).contains("TLS handshake"), "{}", text(&out));
    let (ok, _, err) = finish(child);
    assert!(!ok, "the plain destination reported success");
    assert!(err.contains("speaks TLS"), "{err}");
}

/// Forwards `listener`'s first connection to `to`, flipping one bit of what the source sends
/// after its first 8 KiB (well past the handshake).
fn tampering_proxy(listener: TcpListener, to: String) {
    std::thread::spawn(move || {
        let (mut down, _) = listener.accept().unwrap();
        let mut up = TcpStream::connect(to).unwrap();
        let (mut up_r, mut down_w) = (up.try_clone().unwrap(), down.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut up_r, &mut down_w));
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        loop {
            let n = match down.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if total <= 8192 && total + n > 8192 {
                buf[8192 - total] ^= 0x01;
            }
            total += n;
            if up.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
}

#[test]
fn a_stream_altered_in_flight_is_refused_and_nothing_is_restored() {
    let dir = temp_dir("tamper");
    let ca = TestCa::new("ferry test CA");
    let dest = ca.write_end(&dir, "dest", &["127.0.0.1"]).unwrap();
    let source = ca.write_end(&dir, "source", &["source.example"]).unwrap();
    let (child, addr) = receiver(Some(&dest));
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    tampering_proxy(proxy, addr);

    let out = send(&proxy_addr, Some(&source));
    assert!(!out.status.success(), "the source reported success");
    let (ok, stdout, err) = finish(child);
    assert!(!ok, "the destination accepted an altered stream: {stdout}");
    assert!(err.contains("altered in flight"), "{err}");
    assert!(
        !stdout.contains("mismatches"),
        "the destination restored: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_options_come_as_a_set() {
    let dir = temp_dir("flags");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["sim-send", "--memory", "16M", "--connect", "127.0.0.1:1"])
        .arg("--tls-cert")
        .arg(Path::new(&dir).join("c.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = text(&out);
    assert!(e.contains("--tls-key") && e.contains("--tls-ca"), "{e}");
    let missing = TestFiles {
        cert: dir.join("none-cert.pem"),
        key: dir.join("none-key.pem"),
        ca: dir.join("none-ca.pem"),
    };
    let out = send("127.0.0.1:1", Some(&missing));
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&missing.cert.display().to_string()),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
