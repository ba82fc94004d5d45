//! Migration connections under mutually authenticated TLS: what gets through, what is refused,
//! and that both halves of a connection work at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ferry_lab::pki::TestCa;
use ferry_migration::{connect, Endpoint, Listener, Tls};

/// TLS settings for an end whose certificate from `ca` names `names`, trusting `trust`.
fn end(ca: &TestCa, names: &[&str], trust: &TestCa) -> Tls {
    let e = ca.end(names);
    Tls::from_pem(e.cert.as_bytes(), e.key.as_bytes(), trust.pem().as_bytes()).unwrap()
}

fn listen(tls: Option<Tls>) -> (Listener, Endpoint) {
    let mut l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    if let Some(t) = tls {
        l = l.with_tls(t);
    }
    let ep = l.local_endpoint().unwrap();
    (l, ep)
}

/// Accepts on another thread; the result arrives on the channel.
fn accept_later(l: Listener) -> mpsc::Receiver<std::io::Result<ferry_migration::Connection>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(l.accept());
    });
    rx
}

#[test]
fn both_halves_carry_data_at_once_and_intact() {
    let ca = TestCa::new("ferry test CA");
    let (l, ep) = listen(Some(end(&ca, &["localhost", "127.0.0.1"], &ca)));
    let accepted = accept_later(l);
    let mut src = connect(&ep, 1, Some(&end(&ca, &["source"], &ca)))
        .unwrap()
        .remove(0);
    let dst = accepted
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();

    // 8 MiB each way at the same time: a writer blocked on a full socket must not keep the
    // other half from reading, or both ends would stall.
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    let expect = data.clone();
    let ferry_migration::Connection {
        mut reader,
        mut writer,
        ..
    } = dst;
    let dst_send = {
        let data = data.clone();
        thread::spawn(move || {
            writer.write_all(&data).unwrap();
            writer.flush().unwrap();
        })
    };
    let src_send = thread::spawn(move || {
        src.writer.write_all(&data).unwrap();
        src.writer.flush().unwrap();
        let mut back = vec![0; data.len()];
        src.reader.read_exact(&mut back).unwrap();
        back
    });
    let mut got = vec![0; expect.len()];
    reader.read_exact(&mut got).unwrap();
    assert!(got == expect, "the destination read other bytes than sent");
    dst_send.join().unwrap();
    assert!(
        src_send.join().unwrap() == expect,
        "the source read other bytes"
    );
}

#[test]
fn a_source_with_a_certificate_from_another_ca_is_refused_and_the_destination_keeps_waiting() {
    let ca = TestCa::new("ferry test CA");
    let stranger = TestCa::new("someone else's CA");
    let (l, ep) = listen(Some(end(&ca, &["127.0.0.1"], &ca)));
    let accepted = accept_later(l);

    // The stranger trusts our CA (so it accepts the destination) but its own certificate is
    // not ours: the destination's alert ends its connect.
    let err = connect(&ep, 1, Some(&end(&stranger, &["source"], &ca)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused this end's certificate"), "{err}");
    assert!(
        accepted.recv_timeout(Duration::from_millis(500)).is_err(),
        "the destination accepted a source it cannot authenticate"
    );

    // A source with the right certificate still gets in.
    let _c = connect(&ep, 1, Some(&end(&ca, &["source"], &ca))).unwrap();
    accepted
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
}

#[test]
fn a_destination_with_a_certificate_for_another_host_is_refused() {
    let ca = TestCa::new("ferry test CA");
    let (l, ep) = listen(Some(end(&ca, &["dest.example"], &ca)));
    let _accepted = accept_later(l);
    let source = end(&ca, &["source"], &ca);
    let err = connect(&ep, 1, Some(&source)).unwrap_err().to_string();
    assert!(
        err.contains("invalid peer certificate") && err.contains("--tls-server-name"),
        "{err}"
    );
    // Told which name to expect, the same source accepts it.
    let source = source.with_server_name("dest.example").unwrap();
    connect(&ep, 1, Some(&source)).unwrap();
}

#[test]
fn a_plain_source_is_refused_by_a_tls_destination() {
    let ca = TestCa::new("ferry test CA");
    let (l, ep) = listen(Some(end(&ca, &["127.0.0.1"], &ca)));
    let accepted = accept_later(l);
    let Endpoint::Tcp(addr) = &ep else {
        unreachable!()
    };
    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    plain.write_all(b"FERRYSRC\x01\x00\x00\x00").unwrap();
    // It gets a TLS alert or the connection closed, never ferry's reply.
    let mut reply = Vec::new();
    let _ = plain.read_to_end(&mut reply);
    assert!(
        reply.is_empty() || reply[0] == 0x15,
        "a plain source got {reply:02x?}"
    );
    assert!(accepted.recv_timeout(Duration::from_millis(500)).is_err());
}

#[test]
fn a_tls_source_is_refused_by_a_plain_destination() {
    let ca = TestCa::new("ferry test CA");
    let (l, ep) = listen(None);
    let t = thread::spawn(move || {
        // A plain destination reads the ClientHello as a stream preamble and hangs up.
        let mut c = l.accept().unwrap();
        let mut preamble = [0u8; 12];
        c.reader.read_exact(&mut preamble).unwrap();
        preamble
    });
    let err = connect(&ep, 1, Some(&end(&ca, &["source"], &ca)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS handshake"), "{err}");
    let preamble = t.join().unwrap();
    assert_eq!(&preamble[..2], &[0x16, 0x03], "a TLS handshake record");
}

#[test]
fn a_stream_altered_in_flight_is_refused() {
    let ca = TestCa::new("ferry test CA");
    let (l, ep) = listen(Some(end(&ca, &["127.0.0.1"], &ca)));
    let accepted = accept_later(l);
    // A proxy that flips one bit of the ciphertext once the handshake is done.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_ep: Endpoint = format!("127.0.0.1:{}", proxy.local_addr().unwrap().port())
        .parse()
        .unwrap();
    let Endpoint::Tcp(upstream) = ep.clone() else {
        unreachable!()
    };
    thread::spawn(move || {
        let (mut down, _) = proxy.accept().unwrap();
        let mut up = TcpStream::connect(upstream).unwrap();
        let (mut up_r, mut down_w) = (up.try_clone().unwrap(), down.try_clone().unwrap());
        thread::spawn(move || std::io::copy(&mut up_r, &mut down_w));
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        let mut flipped = false;
        loop {
            let n = match down.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The source's handshake is well under 4 KiB; its data come after 8 KiB.
            if !flipped && total + n > 8192 {
                let i = 8192usize.saturating_sub(total).min(n - 1);
                buf[i] ^= 0x20;
                flipped = true;
            }
            total += n;
            if up.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let source = end(&ca, &["source"], &ca)
        .with_server_name("127.0.0.1")
        .unwrap();
    let mut src = connect(&proxy_ep, 1, Some(&source)).unwrap().remove(0);
    let mut dst = accepted
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    let writer = thread::spawn(move || {
        let _ = src.writer.write_all(&vec![0x5a; 64 << 10]);
        let _ = src.writer.flush();
        src
    });
    let mut got = vec![0u8; 64 << 10];
    let err = dst.reader.read_exact(&mut got).unwrap_err().to_string();
    assert!(err.contains("altered in flight"), "{err}");
    drop(writer);
}

#[test]
fn bad_credentials_are_clear_errors() {
    let ca = TestCa::new("ferry test CA");
    let e = Tls::from_pem(b"not pem", b"", ca.pem().as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    let e = Tls::from_pem(ca.pem().as_bytes(), b"no key here", ca.pem().as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("key"), "{e}");
    let e = Tls::from_files(&ferry_migration::TlsFiles {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
        ca: "/nonexistent/ca.pem".into(),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    let e = end(&ca, &["x"], &ca)
        .with_server_name("not a name!")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a DNS name"), "{e}");
}
